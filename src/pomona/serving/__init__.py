"""The web API of a run (`serve`) and its page (`static/index.html`)."""
