"""Ready-made workloads, the same model and data for every framework.

Each study has a framework-free data part (numpy arrays) and one model builder per
framework, built to the same architecture. Nothing here imports a framework until a
model is built.
"""

STUDIES = {
    "digits-mlp": "autobatch.studies.digits:digits_mlp",
    "digits-cnn": "autobatch.studies.digits:digits_cnn",
    "synthetic-images": "autobatch.studies.synthetic:synthetic_images",
}

__all__ = ["STUDIES"]
