"""Relational KD (Park et al. 2019) against references written from the paper's formulas."""

import itertools

import pytest
import torch

from stillroom.losses.relations import rkd_angle_loss, rkd_distance_loss


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def huber(x: torch.Tensor) -> torch.Tensor:
    """The paper's Huber loss, delta = 1: x^2 / 2 for |x| <= 1, |x| - 1/2 beyond."""
    return 0.5 * x**2 if x.abs() <= 1 else x.abs() - 0.5


def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).sum().sqrt()


def reference_distance_potentials(emb: torch.Tensor) -> torch.Tensor:
    """psi_D over the ordered pairs i != j: ||e_i - e_j|| / (mean distance over those pairs)."""
    emb = emb.double()
    d = [distance(emb[i], emb[j]) for i, j in itertools.permutations(range(emb.shape[0]), 2)]
    return torch.stack(d) / (sum(d) / len(d))


def reference_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over pairs i != j of huber(psi_D^S - psi_D^T)."""
    diffs = reference_distance_potentials(student) - reference_distance_potentials(teacher)
    return (sum(huber(x) for x in diffs) / len(diffs)).float()


def cos_angle(e_i: torch.Tensor, e_j: torch.Tensor, e_k: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex e_j of the triangle (e_i, e_j, e_k)."""
    u, v = e_i - e_j, e_k - e_j
    return (u * v).sum() / (distance(e_i, e_j) * distance(e_k, e_j))


def reference_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over triplets of distinct i, j, k of huber(cos angle_S(i,j,k) - cos angle_T(i,j,k))."""
    s, t = student.double(), teacher.double()
    terms = [
        huber(cos_angle(s[i], s[j], s[k]) - cos_angle(t[i], t[j], t[k]))
        for i, j, k in itertools.permutations(range(student.shape[0]), 3)
    ]
    return (sum(terms) / len(terms)).float()


def rotation(dim: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(randn(dim, dim, seed=seed))
    return q


# ---------------------------------------------------------------- distance


def test_distance_loss_matches_reference_with_different_widths():
    student, teacher = randn(6, 5, seed=1), randn(6, 9, seed=2)
    torch.testing.assert_close(
        rkd_distance_loss(student, teacher), reference_distance_loss(student, teacher)
    )


def test_distance_loss_reaches_the_linear_huber_regime():
    # one far outlier in the student: its normalised distances differ from the teacher's by > 1
    student, teacher = randn(5, 4, seed=3), randn(5, 4, seed=4)
    student[0] += 40.0
    student[1] -= 40.0
    diffs = reference_distance_potentials(student) - reference_distance_potentials(teacher)
    assert diffs.abs().max() > 1 > diffs.abs().min()  # both Huber branches are used
    torch.testing.assert_close(
        rkd_distance_loss(student, teacher), reference_distance_loss(student, teacher)
    )


def test_distance_loss_identical_embeddings_give_zero():
    x = randn(5, 4, seed=5)
    assert rkd_distance_loss(x, x.clone()).item() == 0.0


def test_distance_loss_invariant_to_scaling_rotation_and_translation_of_the_teacher():
    student, teacher = randn(7, 4, seed=6), randn(7, 6, seed=7)
    loss = rkd_distance_loss(student, teacher)
    moved = 3.7 * teacher @ rotation(6, seed=8) + randn(6, seed=9)
    torch.testing.assert_close(rkd_distance_loss(student, moved), loss)
    # a student that is a scaled, rotated copy of the teacher has nothing left to learn
    copy = 0.2 * teacher @ rotation(6, seed=10)
    assert rkd_distance_loss(copy, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_distance_loss_averages_over_distinct_pairs_unlike_the_authors_code():
    # the authors' code: normalise by the mean positive distance, then smooth L1 averaged over
    # all N^2 entries, diagonal zeros included: (N - 1) / N times the paper's mean over pairs
    n = 6
    student, teacher = randn(n, 4, seed=11), randn(n, 8, seed=12)

    def authors_potentials(emb: torch.Tensor) -> torch.Tensor:
        d = (emb[:, None, :] - emb[None, :, :]).pow(2).sum(-1).sqrt()
        return d / d[d > 0].mean()

    authors = torch.nn.functional.smooth_l1_loss(
        authors_potentials(student), authors_potentials(teacher)
    )
    torch.testing.assert_close(authors, rkd_distance_loss(student, teacher) * (n - 1) / n)


def test_distance_loss_gradients_reach_the_student_and_stay_finite_for_duplicates():
    student = randn(5, 3, seed=13)
    student[1] = student[0]  # a sample seen twice in the batch
    student.requires_grad_()
    teacher = randn(5, 8, seed=14)
    loss = rkd_distance_loss(student, teacher)
    loss.backward()
    torch.testing.assert_close(loss.detach(), reference_distance_loss(student.detach(), teacher))
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_distance_loss_of_collapsed_embeddings_is_finite():
    collapsed = torch.zeros(4, 3, requires_grad=True)  # e.g. dead ReLU features
    loss = rkd_distance_loss(collapsed, randn(4, 5, seed=15))
    loss.backward()
    # every student potential is 0, every teacher potential averages 1
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(collapsed.grad).all()


def test_distance_loss_half_precision_computed_in_fp32():
    student, teacher = randn(6, 16, seed=16), randn(6, 32, seed=17)
    loss = rkd_distance_loss(student.half(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(
        loss,
        reference_distance_loss(student.half().float(), teacher.bfloat16().float()),
    )


# ---------------------------------------------------------------- angle


def test_angle_loss_matches_reference_with_different_widths():
    student, teacher = randn(5, 3, seed=18), randn(5, 7, seed=19)
    torch.testing.assert_close(
        rkd_angle_loss(student, teacher), reference_angle_loss(student, teacher)
    )


def test_angle_loss_hand_computed_triangle():
    # student: a right isosceles triangle; teacher: an equilateral one. Per vertex, the student has
    # cosines (0, 1/sqrt2, 1/sqrt2) and the teacher (1/2, 1/2, 1/2); each angle appears in 2 of the
    # 6 ordered triplets (i, k swapped), so the loss is the mean of the 3 Huber terms
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3**0.5 / 2]])
    diffs = torch.tensor([0.0 - 0.5, 2**-0.5 - 0.5, 2**-0.5 - 0.5])
    expected = (0.5 * diffs**2).mean()
    torch.testing.assert_close(rkd_angle_loss(student, teacher), expected)


def test_angle_loss_identical_embeddings_give_zero():
    x = randn(5, 4, seed=20)
    assert rkd_angle_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_angle_loss_invariant_to_scaling_rotation_and_translation():
    student, teacher = randn(6, 4, seed=21), randn(6, 5, seed=22)
    loss = rkd_angle_loss(student, teacher)
    moved = 0.05 * teacher @ rotation(5, seed=23) - 2.0
    torch.testing.assert_close(rkd_angle_loss(student, moved), loss)
    moved_student = 12.0 * student @ rotation(4, seed=24) + 1.0
    torch.testing.assert_close(rkd_angle_loss(moved_student, teacher), loss)


def test_angle_loss_averages_over_distinct_triplets_unlike_the_authors_code():
    # the authors' code averages over all N^3 triplets; degenerate ones add 0 (both cosines 0 for a
    # zero-length arm, both 1 for i == k), so it is (N - 1)(N - 2) / N^2 times the paper's mean
    n = 5
    student, teacher = randn(n, 3, seed=25), randn(n, 6, seed=26)

    def authors_angles(emb: torch.Tensor) -> torch.Tensor:
        diff = emb[None, :, :] - emb[:, None, :]
        unit = torch.nn.functional.normalize(diff, p=2, dim=2)
        return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)

    authors = torch.nn.functional.smooth_l1_loss(authors_angles(student), authors_angles(teacher))
    torch.testing.assert_close(authors, rkd_angle_loss(student, teacher) * (n - 1) * (n - 2) / n**2)


def test_angle_loss_gradients_reach_the_student_and_stay_finite_for_duplicates():
    student = randn(5, 3, seed=27)
    student[2] = student[4]
    student.requires_grad_()
    loss = rkd_angle_loss(student, randn(5, 8, seed=28))
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad.abs().sum() > 0
    # a zero-length arm has no direction; normalising it would give gradients ~1e12
    assert student.grad.abs().max() < 10


def test_angle_loss_of_collapsed_embeddings_is_finite():
    collapsed = torch.zeros(4, 3, requires_grad=True)
    loss = rkd_angle_loss(collapsed, randn(4, 5, seed=29))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(collapsed.grad == 0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("loss_fn", [rkd_distance_loss, rkd_angle_loss])
def test_rkd_bad_input_raises(loss_fn):
    with pytest.raises(ValueError, match="same batch"):
        loss_fn(randn(5, 3), randn(6, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        loss_fn(randn(5, 3, 2, 2), randn(5, 3))
    with pytest.raises(ValueError, match="at least"):
        loss_fn(randn(1, 3), randn(1, 4))


def test_angle_loss_needs_three_samples():
    with pytest.raises(ValueError, match="at least 3"):
        rkd_angle_loss(randn(2, 3), randn(2, 4))
    assert torch.isfinite(rkd_distance_loss(randn(2, 3), randn(2, 4)))
