"""Framework backends behind one trial interface.

Importing this package imports no framework: each backend lives in its own module
(``autobatch.backends.torch.backend``, ``autobatch.backends.tensorflow.backend``) and is loaded by
name through :func:`autobatch.core.registry.get_backend`.
"""

from autobatch.backends.base import Backend, TrialMeasurements, TrialProgress

__all__ = ["Backend", "TrialMeasurements", "TrialProgress"]
