"""An unmodified accelerate training loop (DDP; on a machine without GPUs, gloo).

    accelerate launch --config_file accelerate_2proc.yaml accelerate_ddp.py
"""

import torch
from accelerate import Accelerator
from torch import nn

import _check

accelerator = Accelerator(cpu=not torch.cuda.is_available())
model = _check.make_model()
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
x, y = _check.global_batch()
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=_check.GLOBAL_BATCH // accelerator.num_processes)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
for xb, yb in loader:
    accelerator.backward(nn.functional.cross_entropy(model(xb), yb))
    optimizer.step()
    optimizer.zero_grad()
    break
_check.report("accelerate_ddp", accelerator.process_index, accelerator.unwrap_model(model).named_parameters())
print(f"[accelerate_ddp] rank={accelerator.process_index} distributed_type={accelerator.distributed_type} "
      f"num_processes={accelerator.num_processes}", flush=True)
