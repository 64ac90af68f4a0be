"""The event dispatcher: server, client library, replay (data source) and recorder."""
