"""data_prep: convert a real dataset into the HDF5 shards hpcdd reads (one file per subdomain)."""
