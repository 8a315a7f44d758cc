"""From a request to images: the request shape (`spec`), known models (`registry`), loading a model and
sampling it (`pipeline`), and image output (`images`). `spec` and `registry` are torch-free."""
