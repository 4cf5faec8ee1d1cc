"""`openlora up`: the whole cluster as local child processes on embedded defaults."""
