"""Pure computations over decoded data (aggregation); no I/O."""
