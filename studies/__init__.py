"""Ready-made studies: workloads that are the same in every framework, and real models in one.

A workload (digits, synthetic images) has a framework-free data part (numpy arrays) and one
model builder per framework, built to the same architecture. The real models are tasks in
their framework's own terms, with random weights and nothing downloaded: ``tiny-gpt2``
(transformers' GPT-2, PyTorch), ``resnet18`` (torchvision's ResNet-18, PyTorch) and
``keras-text`` (a Keras transformer on tf.data). Nothing here imports a framework until a
model or its data is made.
"""

STUDIES = {
    "digits-mlp": "autobatch.studies.digits:digits_mlp",
    "digits-cnn": "autobatch.studies.digits:digits_cnn",
    "synthetic-images": "autobatch.studies.synthetic:synthetic_images",
    "tiny-gpt2": "autobatch.studies.tiny_gpt2:tiny_gpt2",
    "resnet18": "autobatch.studies.resnet18:resnet18",
    "keras-text": "autobatch.studies.keras_text:keras_text",
}

__all__ = ["STUDIES"]
