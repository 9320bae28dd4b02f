"""Looking after the photos: checking labelled photos before training (`doctor`, its checks `doctor_checks` and
page `doctor_page`), and which unlabelled photos to label next (`suggest`)."""
