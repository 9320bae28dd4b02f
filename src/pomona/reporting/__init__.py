"""What a run shows people: report.html (`report`), photos with their answer drawn on them (`annotate`) and
Grad-CAM (`explain`)."""
