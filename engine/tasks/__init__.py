"""One module per task; each runs a diffusers pipeline that a runtime has prepared."""
