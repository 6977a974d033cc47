"""The feature store: a Parquet manifest plus one HDF5 file per feature set."""
