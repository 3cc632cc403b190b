"""A model card as Markdown (`render_card`), from the plain record `build_card` makes
(`_card.py`): estimates with intervals, generalisation, shortcuts, operating points."""

from __future__ import annotations

from typing import Any

from automl_cxr._numbers import clip01, finite_or_none

__all__ = ["render_card"]


def _fmt(x: Any, spec: str = ".3f") -> str:
    v = finite_or_none(x)
    return "n/a" if v is None else format(v, spec)


def _ci_text(d: dict[str, Any], key: str) -> str:
    return f"{_fmt(d.get(key))} [{_fmt(d.get(key + '_ci_low'))}, {_fmt(d.get(key + '_ci_high'))}]"


def _est_ci(d: dict[str, Any]) -> str:
    return f"{_fmt(d.get('estimate'))} [{_fmt(d.get('ci_low'))}, {_fmt(d.get('ci_high'))}]"


def _clinic_lines(card: dict[str, Any]) -> list[str]:
    """Calibration, operating point and ensemble selection sections of the card."""
    lines: list[str] = []
    sel = card.get("selected_ensemble")
    if sel:
        lines += ["", "## Ensemble selected across trials", ""]
        lines.append(
            f"Caruana greedy forward selection with replacement ({sel['n_rounds']} rounds) over "
            f"the out-of-fold predictions of {sel['candidates']} complete trials, on "
            f"{sel['metric']}; each member retrained on all the training data; the graph "
            "averages the members' probabilities with these weights."
        )
        lines += ["", "| trial | weight | its own out-of-fold score |", "| ---: | ---: | ---: |"]
        lines += [
            f"| {m['trial']} | {m['weight']:.3f} | {_fmt(m.get('single_score'), '.4f')} |"
            for m in sel["members"]
        ]
        lines += [
            "",
            f"- out-of-fold {sel['metric']}: ensemble {_fmt(sel['score'], '.4f')}, best single "
            f"trial ({sel['best_single']}) {_fmt(sel['best_single_score'], '.4f')} — "
            + sel["caveat"],
        ]
        n = sel.get("nested") or {}
        if n.get("available"):
            e, b = n["ensemble"], n["best_single"]
            lines.append(
                f"- nested estimate (select on K-1 folds, score the held-out one): ensemble "
                f"{_fmt(e['mean'], '.4f')} [{_fmt(clip01(e['ci_low']), '.4f')}, "
                f"{_fmt(clip01(e['ci_high']), '.4f')}], best single {_fmt(b['mean'], '.4f')} "
                f"[{_fmt(clip01(b['ci_low']), '.4f')}, {_fmt(clip01(b['ci_high']), '.4f')}] "
                "(95% t-interval over folds, clipped to [0, 1])"
            )
    ts = card.get("test_split")
    if ts:
        lines += ["", "## Test split (never seen by the search)", ""]
        held = ", ".join(f"{c} {n}" for c, n in (ts.get("classes") or {}).items())
        lines.append(
            f"`search --test {ts['spec']}` set {ts['images']} images of {ts['patients']} "
            f"patients ({held}) aside before the search; no choice of the search saw them."
        )
        lines.append("")
        lines.append(f"- this exported model: {ts['metric']} {_est_ci(ts['exported'])}")
        if ts.get("trial_fold_models"):
            lines.append(
                f"- the trial's fold models (as the search scored it): {ts['metric']} "
                f"{_est_ci(ts['trial_fold_models'])}"
            )
        lines += ["", "95% CIs: bootstrap over the test split's patients."]
    cal = card.get("calibration")
    if cal:
        b, a = cal["before"], cal["after"]
        ins = cal.get("after_in_sample")
        lines += ["", "## Calibration", ""]
        applied = cal.get("applied", True)
        lines.append(
            f"Temperature scaling: T = {cal['temperature']:.3f}, fitted on {cal['fitted_on']}; "
            + (
                "baked into model.ts / model.onnx (softmax(logits / T))."
                if applied
                else "**not applied**: on held-out patients (cross-fitted) it raised the NLL, "
                "so the exported probabilities are the model's own."
            )
        )
        lines += [
            "",
            "| | ECE [95% CI] | Brier | NLL |",
            "| --- | --- | ---: | ---: |",
            f"| before | {_ci_text(b, 'ece')} | {_fmt(b['brier'])} | {_fmt(b['nll'])} |",
            f"| after, cross-fitted | {_ci_text(a, 'ece')} | {_fmt(a['brier'])} | "
            f"{_fmt(a['nll'])} |",
        ]
        if ins:
            lines.append(
                f"| after, in-sample | {_ci_text(ins, 'ece')} | {_fmt(ins['brier'])} | "
                f"{_fmt(ins['nll'])} |"
            )
        lines += [
            "",
            f"ECE: top-label expected calibration error ({b['n_bins']} bins) of the exported "
            f"model's predictions on the {b['n']} holdout images, 95% CI from a bootstrap over "
            f"{b['n_groups']} patients. Cross-fitted ({cal.get('crossfit', 'parts')}): each "
            "part scored with a temperature fitted on the other parts. The in-sample row is "
            "scored on the predictions its temperature was fitted on (optimistic).",
        ]
    hd = card.get("holdout_decisions")
    if hd:
        shares = ", ".join(f"{c} {v:.0%}" for c, v in hd["predicted_share"].items())
        lines += [
            "",
            f"Decisions on the {hd['n']} holdout images (arg-max, before any threshold): "
            f"balanced accuracy {_fmt(hd['balanced_accuracy'])}; called {shares}. Patients "
            "like the training ones, so not a generalisation estimate: a check that the "
            "retrained model is the one the search scored, not a degenerate one.",
        ]
    op = card.get("operating_point")
    if op:
        target = "" if op.get("target") is None else f"={op['target']}"
        ins = op.get("in_sample") or {}
        lines += ["", "## Operating point", ""]
        lines.append(
            f"`{op['rule']}{target}` on `{op['positive']}`: called {op['positive']} when its "
            f"probability is >= {op['threshold']:.4f} (else the most probable other class); "
            f"chosen on {op['chosen_on']}"
            + (" after temperature scaling" if op.get("calibrated") else "")
            + "."
        )
        lines += [
            "",
            f"- expected sensitivity {_ci_text(op, 'sensitivity')} (cross-fitted)",
            f"- expected specificity {_ci_text(op, 'specificity')} (cross-fitted)",
        ]
        if ins:
            lines.append(
                f"- in-sample (chosen and scored on the same images): sensitivity "
                f"{_fmt(ins['sensitivity'])}, specificity {_fmt(ins['specificity'])}"
            )
        lines += [
            f"- at the arg-max instead: sensitivity {_fmt(op['argmax_sensitivity'])}, "
            f"specificity {_fmt(op['argmax_specificity'])}",
            "",
            f"Cross-fitted ({op.get('crossfit', 'parts')}): each part's threshold chosen on the "
            "other parts, the pooled held-out calls scored; 95% CIs: bootstrap over patients. "
            "Check it on an external set (`automl-cxr evaluate --model DIR`).",
        ]
    return lines


def render_card(card: dict[str, Any]) -> str:
    """Markdown for `model_card.md`."""
    lines: list[str] = [f"# Model card: {card['title']}", ""]
    lines += ["> **Intended use: research only, not a medical device.**", ">"]
    lines += [f"> {card['intended_use']}", ""]
    seg = card.get("segmenter_warning")
    if card["warnings"] or seg:
        lines += ["## Warnings", ""]
        lines += [f"- **Not the searched preprocessing:** {seg}"] if seg else []
        lines += [f"- **Shortcut risk:** {w}" for w in card["warnings"]]
        lines.append("")
    m = card["model"]
    inp = card["input"]
    r = inp["resolution"]
    net = inp.get("network_resolution", r)
    lines += [
        "## Model",
        "",
        f"- backbone: `{m['backbone']}` (frozen stages {m['frozen_stages']}, head `{m['head']}` "
        f"{m.get('head_kwargs') or {}}, gray mode `{m['gray_mode']}`)",
        f"- classes (output order): {', '.join(card['classes'])}",
        f"- resolution: {net} x {net}"
        + (f" (the network's; the exported graph takes {r} px)" if net != r else ""),
    ]
    if m.get("params_total"):
        lines.append(f"- parameters: {m['params_total']:,}")
    ws = m.get("weight_source") or {}
    if ws:
        lines.append(
            f"- initial weights: {ws.get('kind')} ({ws.get('description') or ws.get('path')})"
        )
    lines += [
        "",
        "## Input contract",
        "",
        f"`{inp['shape']}` {inp['dtype']} in {inp['range']}, R = {r}. " + inp["description"],
        "",
    ]
    pp = inp.get("preprocess")
    if pp:
        seg = pp.get("segmenter") or {}
        lines += [
            f"The graph's first layer applies the trial's levers to that {r} px image — roi "
            f"`{pp['roi']}`, intensity `{pp['intensity']}`"
            + (f", lungs found by segmenter `{seg['key']}`" if seg.get("key") else "")
            + f" — and resizes the result to the network's {net} x {net}, as the search's "
            "image cache did: give it the whole radiograph, not a crop.",
            "",
        ]
    d = card["data"]
    lines += ["## Training data", ""]
    lines.append(f"- dataset: `{d['dataset']}` ({d.get('kind') or 'prepared'})")
    if d.get("recipe"):
        r = d["recipe"]
        lines.append(f"- recipe: {r.get('description')}")
        if r.get("reference"):
            lines.append(f"- reference: {r['reference']}")
    if d.get("origin"):
        lines.append(f"- origin: {d['origin']}")
    lines.append(f"- manifest hash: `{d['manifest_hash']}`")
    if d.get("subset"):
        lines.append(f"- subset: {d['subset']} (hash `{d['training_hash']}`)")
    lines.append(
        f"- images: {d['images']} ("
        + ", ".join(f"{k} {v}" for k, v in d["classes"].items())
        + "); sources: "
        + ", ".join(f"{k} {v}" for k, v in d["sources"].items())
    )
    lines.append(f"- {card['training']['retrained_on']}")
    ep = card["training"].get("epochs")
    if ep:
        n = ep["epochs"]
        lines.append(f"- trained for {n} epoch{'' if n == 1 else 's'}: {ep['why']}")
    members = card["training"].get("ensemble") or []
    if members:
        lines += ["", "Fold members (each scored on its own validation fold):", ""]
        lines += [
            "| fold | train | val | epochs | balanced accuracy | accuracy |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {f['fold']} | {f['n_train']} | {f['n_val']} | {f['epochs_run']} | "
            f"{_fmt(f.get('balanced_accuracy'))} | {_fmt(f.get('accuracy'))} |"
            for f in members
        ]
    s = card["study"]
    lines += [
        "",
        "## Study",
        "",
        f"- study `{s['study']}`, trial {s['trial']} (objectives {', '.join(s['objectives'])}: "
        + ", ".join(_fmt(v, ".4f") for v in s["values"])
        + ")",
    ]
    if s.get("storage"):
        lines.append(f"- storage: `{s['storage']}`")
    met = card["metrics"]
    lines += ["", "## Metrics", "", f"{met['protocol']}.", ""]
    lines += ["| metric | mean | 95% CI |", "| --- | ---: | --- |"]
    for name, v in met["cv"].items():
        lines.append(
            f"| {name} | {_fmt(v['mean'])} | [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}] |"
        )
    if met["by_source"]:
        lines += ["", "Out-of-fold metrics per image source:", ""]
        lines += [
            "| source | images | accuracy | balanced accuracy |",
            "| --- | ---: | ---: | ---: |",
        ]
        for src, v in met["by_source"].items():
            lines.append(
                f"| {src} | {v['n']} | {_fmt(v['accuracy'])} | {_fmt(v['balanced_accuracy'])} |"
            )
    lines += _clinic_lines(card)
    diag = card["diagnostics"]
    al = diag["source_label_alignment"]
    lines += ["", "## Diagnostics", ""]
    lines.append(f"- source-label alignment: Cramér's V = {_fmt(al.get('cramers_v'), '.2f')}")
    for c in al.get("confounded_classes") or []:
        lines.append(f"  - every `{c['label']}` image comes from `{c['source']}`")
    pr = diag.get("source_probe")
    if pr:
        if pr.get("auc") is not None:
            lines.append(
                f"- source probe: the image source is predicted from pixels with ROC-AUC "
                f"{_fmt(pr['auc'])} ({pr['method']})"
            )
        else:
            lines.append(f"- source probe: not run ({pr.get('note')})")
    lines += ["", "## Limitations", ""]
    lines += [f"- {x}" for x in card["limitations"]]
    ex = card.get("export") or {}
    if ex.get("files"):
        lines += ["", "## Files", ""]
        for name, info in ex["files"].items():
            lines.append(
                f"- `{name}`: {info.get('what', '')} (sha256 `{info.get('sha256', '')[:16]}…`)"
            )
    lines.append("")
    return "\n".join(lines)
