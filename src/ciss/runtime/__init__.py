"""Runtime: engines, the Segmenter, the retention gate and the HTTP server."""
