"""Cross-modal contrastive loss and intrinsic-modal cosine alignment on known vectors."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unialignment.alignment.contrastive import contrastive_loss, pool_tokens
from unialignment.alignment.representation import cosine_alignment_loss


def test_pooling_with_and_without_a_token_mask():
    states = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]])
    torch.testing.assert_close(pool_tokens(states), torch.tensor([[3.0, 2.0]]))
    torch.testing.assert_close(pool_tokens(states, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 1.0]]))


def test_contrastive_loss_on_orthonormal_pairs():
    # Matched one-hot features: logits 1/T on the diagonal, 0 elsewhere, both directions alike.
    batch, temperature = 4, 0.5  # a larger temperature keeps the loss well above float32 rounding
    features = torch.eye(batch)
    expected = -math.log(math.exp(1 / temperature) / (math.exp(1 / temperature) + batch - 1))
    assert contrastive_loss(features, 3.0 * features, temperature).item() == pytest.approx(expected, rel=1e-5)
    # Identical features everywhere: every row is uniform, the loss is log B.
    same = torch.ones(batch, 5)
    assert contrastive_loss(same, same).item() == pytest.approx(math.log(batch), rel=1e-5)


def test_contrastive_loss_with_repeated_captions_as_shared_positives():
    # Rows 0 and 1 are the same pair twice: each row's target is split between them, row 2 matches itself.
    temperature = 0.5
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    e = math.exp(1 / temperature)
    duplicated_row = -math.log(e / (2 * e + 1))  # half the target on each of two equal logits
    single_row = -math.log(e / (e + 2))
    expected = (2 * duplicated_row + single_row) / 3
    loss = contrastive_loss(features, features, temperature, positives=positives)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the identity as positives is the default diagonal target
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    assert contrastive_loss(image, text, positives=torch.eye(4)).item() == pytest.approx(
        contrastive_loss(image, text).item(), rel=1e-6
    )


def test_contrastive_loss_is_symmetric_in_its_directions():
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    assert contrastive_loss(image, text).item() == pytest.approx(contrastive_loss(text, image).item(), rel=1e-6)


def test_cosine_alignment_on_known_vectors():
    predicted = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    expected = (1.0 + (1 - 1 / math.sqrt(2)) + 0.0) / 3
    assert cosine_alignment_loss(predicted, target).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="teacher target"):
        cosine_alignment_loss(predicted, torch.zeros(3, 4))


def _gathered_rank(rank, world_size, port, image, text, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    local = slice(rank * 3, rank * 3 + 3)
    local_image = image[local].clone().requires_grad_(True)
    loss = contrastive_loss(local_image, text[local], gather_across_ranks=True)
    loss.backward()
    results[rank] = (loss.item(), local_image.grad.abs().sum().item())
    dist.destroy_process_group()


def test_gathered_negatives_reproduce_the_global_batch_loss():
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_gathered_rank, args=(2, port, image, text, results), nprocs=2, join=True)
    mean_of_ranks = (results[0][0] + results[1][0]) / 2
    assert mean_of_ranks == pytest.approx(contrastive_loss(image, text).item(), rel=1e-5)
    assert results[0][1] > 0 and results[1][1] > 0
