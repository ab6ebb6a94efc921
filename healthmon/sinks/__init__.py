"""Where healthmon's findings go: TensorBoard event files, the JSON report, the terminal."""
