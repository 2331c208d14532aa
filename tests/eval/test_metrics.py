"""Retrieval and zero-shot metrics against brute-force references."""
import pytest
import torch
import torch.nn.functional as F
from proalign.eval.retrieval import retrieval_metrics
from proalign.eval.zeroshot import classification_metrics


def _brute_force(image, text, owner, k):
    """Plain loops: clip_benchmark's multi-caption recall."""
    sims = (text.double() @ image.double().T).tolist()
    t2i = 0
    for t, row in enumerate(sims):
        order = sorted(range(len(row)), key=lambda i: -row[i])
        t2i += owner[t] in order[:k]
    i2t, counted = 0, 0
    for i in range(image.shape[0]):
        mine = [t for t in range(len(owner)) if owner[t] == i]
        if not mine:
            continue
        counted += 1
        column = [sims[t][i] for t in range(len(owner))]
        order = sorted(range(len(column)), key=lambda t: -column[t])
        i2t += any(t in order[:k] for t in mine)
    return t2i / len(owner), i2t / counted


@pytest.mark.parametrize("chunk", [3, 7, 1024])
def test_chunked_retrieval_matches_brute_force(chunk):
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(23, 8, generator=g), dim=-1)
    owner = [i % 20 for i in range(55)]  # three images without captions, up to 3 captions each
    text = F.normalize(image[owner] + 0.9 * torch.randn(55, 8, generator=g), dim=-1)
    got = retrieval_metrics(image, text, torch.tensor(owner), ks=(1, 5, 10), chunk=chunk)
    for k in (1, 5, 10):
        t2i, i2t = _brute_force(image, text, owner, k)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i)
        assert got[f"i2t_R@{k}"] == pytest.approx(i2t)


@pytest.mark.parametrize("chunk", [2, 5, 1024])
def test_top1_share_is_the_most_chosen_images_share_of_first_answers(chunk):
    """A hub image (close to every caption) is the first answer of most captions."""
    g = torch.Generator().manual_seed(3)
    image = F.normalize(torch.randn(12, 8, generator=g), dim=-1)
    owner = list(range(12)) * 2
    text = F.normalize(image[owner] + 0.3 * torch.randn(24, 8, generator=g), dim=-1)
    firsts = (text.double() @ image.double().T).argmax(1)
    expected = torch.bincount(firsts, minlength=12).max().item() / 24
    assert retrieval_metrics(image, text, torch.tensor(owner), chunk=chunk)["t2i_top1_max_share"] == pytest.approx(expected)
    hub = image.clone()
    hub[7] = F.normalize(text.mean(0), dim=-1)
    share = retrieval_metrics(hub, text, torch.tensor(owner), chunk=chunk)["t2i_top1_max_share"]
    assert share == pytest.approx(torch.bincount((text.double() @ hub.double().T).argmax(1), minlength=12).max().item() / 24)
    assert share > expected


@pytest.mark.parametrize("chunk", [1, 2, 3, 1024])
def test_exact_ties_rank_lowest_index_first_at_any_chunk_size(chunk):
    """Duplicated images and a caption repeated for two images: equal scores rank by index,
    lowest first (clip_benchmark's topk), whatever the chunk size."""
    g = torch.Generator().manual_seed(5)
    image = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    image[3] = image[1]  # a duplicated image
    owner = [0, 1, 2, 3, 3, 2]
    text = F.normalize(image[owner] + 0.05 * torch.randn(6, 16, generator=g), dim=-1)
    text[5] = text[2]  # the same caption for image 2 twice
    text[3] = text[1]  # and one caption shared by the two duplicated images
    got = retrieval_metrics(image, text, torch.tensor(owner), ks=(1, 2), chunk=chunk)
    for k in (1, 2):
        t2i, i2t = _brute_force(image, text, owner, k)
        assert got[f"t2i_R@{k}"] == pytest.approx(t2i) and got[f"i2t_R@{k}"] == pytest.approx(i2t)
    # caption 3 belongs to image 3, whose twin image 1 comes first: a miss at k=1
    assert got["t2i_R@1"] == pytest.approx(4 / 6)


def test_recall_standard_error_and_chance_match_hand_computation():
    import itertools
    from proalign.eval.retrieval import recall_uncertainty
    owners = torch.tensor([0, 0, 1, 2, 2, 2])  # 3 images with 2, 1 and 3 captions
    metrics = {"t2i_R@1": 0.5, "i2t_R@2": 2 / 3}
    got = recall_uncertainty(metrics, owners, 3)
    assert got["t2i_R@1_se"] == pytest.approx((0.25 / 6) ** 0.5)
    assert got["i2t_R@2_se"] == pytest.approx(((2 / 3) * (1 / 3) / 3) ** 0.5)
    assert got["t2i_R@1_chance"] == pytest.approx(1 / 3)
    # i2t chance by enumerating every ordered top-2 of the 6 captions, per image
    exact = []
    for image in range(3):
        tops = list(itertools.permutations(range(6), 2))
        exact.append(sum(any(owners[t] == image for t in top) for top in tops) / len(tops))
    assert got["i2t_R@2_chance"] == pytest.approx(sum(exact) / 3)


def test_weighted_mean_standard_error():
    from proalign.eval.report import image_weighted_se, with_se
    rows = [{"images": 100, "m": 0.2, "m_se": 0.04}, {"images": 300, "m": 0.1, "m_se": 0.02}]
    assert image_weighted_se(rows, "m") == pytest.approx(((100 * 0.04) ** 2 + (300 * 0.02) ** 2) ** 0.5 / 400)
    assert with_se(0.1234, 0.0101) == "0.123 ± 0.010" and with_se(0.5, None) == "0.500"


def test_classification_top_k_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    classes = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    labels = torch.randint(6, (40,), generator=g)
    images = F.normalize(classes[labels] + torch.randn(40, 5, generator=g), dim=-1)
    got = classification_metrics(images @ classes.T, labels)
    scores = (images @ classes.T).tolist()
    for k, key in ((1, "top1"), (5, "top5")):
        hits = [labels[i].item() in sorted(range(6), key=lambda c: -scores[i][c])[:k] for i in range(40)]
        assert got[key] == pytest.approx(sum(hits) / 40)


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError, match="needs images and captions"):
        retrieval_metrics(torch.empty(0, 4), torch.randn(2, 4), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="outside the image set"):
        retrieval_metrics(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 5]))


def test_evaluator_shows_inner_progress_and_chunking_keeps_the_numbers(monkeypatch, capsys):
    import torch
    from proalign.eval import evaluator as ev
    g = torch.Generator().manual_seed(0)
    images = torch.randn(5, 8, generator=g)
    metas = {f"k{i}": {"captions": {"en": [f"e{i}", f"f{i}"], "de": [f"d{i}"]}} for i in range(5)}
    table = {f"{p}{i}": images[i] + 0.5 * torch.randn(8, generator=g) for i in range(5) for p in "efd"}
    tower = ev.TextTower("toy", lambda texts, ids: torch.stack([table[t] for t in texts]))
    s = ev.EvalSet("toyset", images, list(metas), metas)
    whole = ev.Evaluator([s]).evaluate(lambda x: x, [tower])
    capsys.readouterr()
    monkeypatch.setattr(ev, "TEXT_CHUNK", 2)
    chunked = ev.Evaluator([s], progress=True).evaluate(lambda x: x, [tower])
    err = capsys.readouterr().err
    assert "toyset: images" in err and "toyset: captions" in err
    assert chunked == whole and {r["language"] for r in whole} == {"en", "de"}
