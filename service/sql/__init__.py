"""The SQL face: a SingleStore-flavoured vector SQL dialect planned onto the index and DuckDB."""
