"""A pytest plugin (``-p tests.nvml_sees_a_gpu``): NVML reports one GPU, whatever the machine has.

For checking what ``make test-gpu`` does on a machine where the driver sees a GPU that no
framework can use.
"""

import pynvml

pynvml.nvmlInit = lambda: None
pynvml.nvmlShutdown = lambda: None
pynvml.nvmlDeviceGetCount = lambda: 1
