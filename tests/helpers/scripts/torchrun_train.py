"""A user script as torchrun runs it: no init_process_group, only autopar.compile (issue 16 item 8).
Prints each step's loss on rank 0 and the single-process reference's."""

import copy

import torch

import autopar
from autopar.losses import cross_entropy


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = autopar.models.build("gpt", num_layers=2, hidden_size=32, num_heads=2, vocab_size=64, seq_len=8)
    inputs, targets = autopar.models.example_batch(model, batch_size=4, seq_len=8)
    reference = copy.deepcopy(model)
    compiled = autopar.compile(model, "local:2", fix={"dp": 2},
                               optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        loss = compiled.step(inputs, targets)
        optimizer.zero_grad()
        expected = cross_entropy(reference(inputs), targets)
        expected.backward()
        optimizer.step()
        if torch.distributed.get_rank() == 0:
            print(f"loss {loss:.7f} reference {float(expected):.7f}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
