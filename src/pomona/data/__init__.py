"""Photos and tables: decoding (`images`), folder and CSV layouts (`index`), the split (`split`), the split table
and its classes (`bundle.DataBundle`), near-duplicate groups from features (`groups`), Augmentor balancing
(`balance`), the one description of the training augmentation (`augment`), how a photo becomes a model input
(`preprocessing`) and the augmentation of whole batches on the device (`batch_augment`)."""
