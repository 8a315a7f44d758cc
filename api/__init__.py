"""The HTTP API. It never imports torch: it validates, queues and serves results."""
