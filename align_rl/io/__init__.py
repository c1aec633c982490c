"""Reading and writing: the channel schema, states, grids and regridding, ERA5/zarr stores, normalisation, checkpoints and the preference store."""
