"""The success criteria of issue 4, each with what was measured and PASS / MISS."""

from .settings import CONDITION_KINDS, Settings

SEEN_PPL_RATIO_TARGET = 1.005  # issue 4: generated-LoRA perplexity at most this times the original LoRA's


def ratios_to_original(results: dict, method: str) -> dict[str, float]:
    """Per seen domain: the method's held-out perplexity / the original LoRA's."""
    return {d: m[method]["perplexity"] / m["original LoRA"]["perplexity"] for d, m in results["seen"].items()}


def targets(results: dict, settings: Settings) -> list[dict]:
    """The success criteria of issue 4, each with what was measured and PASS / MISS."""
    rows = []

    def add(target: str, measured: str, passed: bool) -> None:
        rows.append({"target": target, "measured": measured, "status": "PASS" if passed else "MISS"})

    for kind in CONDITION_KINDS:
        mean, best = f"generated ({kind}, mean)", f"generated ({kind}, best of {settings.best_of_k})"
        for method in (mean, best):
            ratios = ratios_to_original(results, method)
            worst = max(ratios, key=ratios.get)
            add(
                f"seen: {method} PPL <= {SEEN_PPL_RATIO_TARGET} x original, every domain",
                f"worst {worst} {ratios[worst]:.4f}",
                ratios[worst] <= SEEN_PPL_RATIO_TARGET,
            )
            for rival in ("model soup", "TIES merge", "shuffled condition"):
                beaten = []
                for methods in results["seen"].values():
                    rival_key = next(
                        k
                        for k in methods
                        if k.startswith(rival) and (rival != "shuffled condition" or f"({kind})" in k)
                    )
                    beaten.append(methods[method]["perplexity"] < methods[rival_key]["perplexity"])
                add(f"seen: {method} beats {rival}, every domain", f"{sum(beaten)}/{len(beaten)} domains", all(beaten))
        copies = {
            d: v["generated_to_nearest_checkpoint"] > v["own_checkpoint_spread_mean"]
            for d, v in results["distances"][kind].items()
        }
        add(
            f"not a copy ({kind}): distance to nearest checkpoint > own checkpoint spread",
            f"{sum(copies.values())}/{len(copies)} domains",
            all(copies.values()),
        )
    for kind in CONDITION_KINDS:
        if not results["unseen"]:
            break
        method = f"generated from {kind}"
        shares = {d: m[method]["recovered"] for d, m in results["unseen"].items()}
        beats = {
            d: m[method]["perplexity"] < m["model soup of the other domains"]["perplexity"]
            for d, m in results["unseen"].items()
        }
        worst = min(shares, key=shares.get)
        add(
            f"unseen ({kind}): recovers >= 50% of base->LoRA drop, every held-out domain",
            f"worst {worst} {shares[worst]:.0%}",
            shares[worst] >= 0.5,
        )
        add(
            f"unseen ({kind}): beats soup of the other domains",
            f"{sum(beats.values())}/{len(beats)} domains",
            all(beats.values()),
        )
    cost_ = results["cost"]
    add(
        "generator <= 5% of the bank's bytes",
        f"{cost_['generator_over_bank']:.1%}",
        cost_["generator_over_bank"] <= 0.05,
    )
    add(
        "generate_adapter (description -> files) <= 1.5 x PEFT load from disk",
        f"{cost_['generate_over_load']:.2f} x",
        cost_["generate_over_load"] <= 1.5,
    )
    return rows
