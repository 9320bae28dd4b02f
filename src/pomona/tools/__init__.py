"""Side tools: the balancing ablation (`ablate`), augmentation previews (`preview`) and demo data (`fetch`)."""
