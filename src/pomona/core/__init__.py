"""The base every other package stands on: `PomonaError` and its kinds (`errors`), atomic file writes (`atomic`),
progress bars and lines (`progress`), and the memory allocator of the process (`runtime`)."""
