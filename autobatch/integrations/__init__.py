"""Take a tuned config to where people train: Lightning, Keras ``fit``, Hugging Face ``Trainer``.

Each integration is its own module and an optional extra (``autobatch[lightning]``,
``autobatch[huggingface]``); importing ``autobatch`` or this package imports none of them.
"""

from autobatch.integrations._recommendation import Recommendation, load_recommendation

__all__ = ["Recommendation", "load_recommendation"]
