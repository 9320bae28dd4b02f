"""Training: the decoded-image cache and the device `ImageStore` (`datasets`), torchrun (`distributed`), backbone
features (`extract`), near-duplicate grouping of a run's photos (`grouping`), the summary before training (`plan`),
the loaders, optimiser, steps and the one epoch loop (`loaders`, `optim`, `steps`, `fit`), a whole run (`train`),
the frozen-feature fast path (`features`), self-training (`selftrain`) and cross-validation (`cv`). Never imports
optuna or a tracker: they attach through callbacks."""
