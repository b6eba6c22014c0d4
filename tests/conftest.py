import os

import torch

# Two intra-op threads (this project's machines have two cores); under pytest-xdist the
# workers share the cores: one thread each when there are fewer cores than workers x 2.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // _workers)))
