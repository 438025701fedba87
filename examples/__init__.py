"""cimc's examples: data generators, model zoo, training and evaluation scripts (run each as a script)."""
