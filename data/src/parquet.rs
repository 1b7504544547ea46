//! verl parquet (stub)
