"""The evaluation report opened in headless Chromium: every figure decodes, the curves are in the order the stages
trained, the title names the run; a screenshot is kept.

The screenshot lands in tests/artifacts/ (gitignored); its path is printed.
"""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from components.config import from_mapping
from components.datasets import write_jsonl
from components.evaluate.config import EvaluateConfig
from components.evaluate.main import run as run_evaluate
from components.evaluate.report import StageResult, collect, write_report
from components.sft.config import SFTConfig
from components.sft.main import run as run_sft
from components.tasks import get_task

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Marks every image once the page has loaded: data-ok="1" when it decoded to a non-empty bitmap.
CHECK = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
         "img.dataset.ok = img.complete && img.naturalWidth > 0 ? '1' : '0'; "
         "document.body.dataset.checked = String(document.images.length); });</script>")


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium "
                    "(`make test` installs it: scripts/test-deps.sh)")
    return exe


def run_chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class Images(HTMLParser):
    """The images of a page, its title and heading, and each figure's image alt text and caption by figure id."""

    def __init__(self):
        super().__init__()
        self.images, self.checked = [], None
        self.text: dict[str, str] = {}  # "title", "h1", "<figure id> alt", "<figure id> caption"
        self._figure, self._in = None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
            if self._figure:
                self.text[f"{self._figure} alt"] = a.get("alt", "")
        if tag == "body":
            self.checked = a.get("data-checked")
        if tag == "figure":
            self._figure = a.get("id")
        if tag in ("title", "h1", "figcaption"):
            self._in = tag if tag != "figcaption" else f"{self._figure} caption"

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None
        if tag in ("title", "h1", "figcaption"):
            self._in = None

    def handle_data(self, data):
        if self._in:
            self.text[self._in] = self.text.get(self._in, "") + data


def rendered(page: Path, tmp_path: Path) -> Images:
    """The report's DOM after Chromium loaded it, with each <img> marked decoded or not."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = run_chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    parsed = Images()
    parsed.feed(dom)
    assert parsed.checked is not None, "the check script did not run"
    assert int(parsed.checked) == len(parsed.images)
    return parsed


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_model_dir):
    """Real SFT and PSFT runs of a few steps, then the evaluate stage on them with the base as a baseline."""
    root = tmp_path_factory.mktemp("report")
    data = root / "train.jsonl"
    write_jsonl(data, get_task("arithmetic").generate(64, seed=0))
    for method, extra in (("sft", {}), ("psft", {"updates_per_batch": 2})):
        run_sft(from_mapping(SFTConfig, {"model": str(tiny_model_dir), "train_data": str(data),
                                         "objective": {"method": method, **extra}, "output_dir": str(root / method),
                                         "max_length": 64,
                                         "train": {"max_steps": 4, "batch_size": 8, "token_budget": 256, "lr": 0.003}}))
    cfg = from_mapping(EvaluateConfig, {
        "model": str(root / "psft" / "model"), "name": "psft", "output_dir": str(root / "eval"),
        "baselines": {"base": str(tiny_model_dir), "sft": str(root / "sft" / "model")},
        "base_model": str(tiny_model_dir), "parents": {"psft": "base"},
        "suites": [{"task": "arithmetic", "split": "id", "n_prompts": 8}, {"task": "arithmetic", "split": "ood",
                                                                           "n_prompts": 8}],
        "samples": 2, "temperature": 1.0, "max_new_tokens": 6, "k": [1, 2], "bootstrap_samples": 200,
        "training_metrics": {m: str(root / m / "metrics.jsonl") for m in ("sft", "psft")}})
    run_evaluate(cfg)
    return root


def test_report_renders_every_figure_in_chromium(stages, tmp_path):
    page = stages / "eval" / "report.html"
    html = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the report must not load anything"
    dom = rendered(page, tmp_path)
    ids = re.findall(r'<figure id="fig-([a-z-]+)"', html)
    assert ids == ["accuracy", "id-vs-ood", "entropy", "training-entropy"]
    assert len(dom.images) == len(ids) and all(img.get("data-ok") == "1" for img in dom.images), dom.images
    assert "Reward curve: omitted" in html  # no stage logged rewards: a note, not a failure
    for name in ("base", "sft", "psft", "arithmetic-id", "arithmetic-ood"):
        assert name in html
    # sft, then psft (the candidate) trained from base, not from sft: a branch on the step axis; no pipeline run:
    # named by the candidate
    assert dom.text["fig-training-entropy caption"] == "Entropy over training steps (sft | psft (from base))"
    assert dom.text["title"] == dom.text["h1"] == "Evaluation of psft"
    # psft's effect against base on both suites, each with its paired interval and verdict
    effects = json.loads((stages / "eval" / "eval.json").read_text())["effects"]
    assert {(e["stage"], e["against"], e["suite"]) for e in effects} == {
        ("psft", a, s) for a in ("previous", "base") for s in ("arithmetic-id", "arithmetic-ood")}
    assert "Effect of each stage" in html and html.count("within noise") + html.count("better") \
        + html.count("worse") >= len(effects)

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "evaluate-report.png"
    shot.unlink(missing_ok=True)
    run_chromium(tmp_path, "--window-size=1280,3200", "--hide-scrollbars", f"--screenshot={shot}", page.as_uri())
    print(f"report screenshot: {shot}")
    with Image.open(shot) as im:
        assert im.size == (1280, 3200)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100  # something is drawn on the page


def test_the_check_catches_an_image_that_does_not_decode(stages, tmp_path):
    page = tmp_path / "broken.html"
    html = (stages / "eval" / "report.html").read_text()
    page.write_text(html.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1))
    dom = rendered(page, tmp_path)
    assert [img.get("data-ok") for img in dom.images].count("0") == 1


def test_report_of_any_stages_leaves_out_what_is_missing(stages, tmp_path):
    """Stage names of the demo; one eval unreadable, one metrics file missing, a GRPO-shaped reward log."""
    grpo_log = tmp_path / "grpo-metrics.jsonl"  # the columns the GRPO stage logs, values from the psft run
    psft = [json.loads(ln) for ln in (stages / "psft" / "metrics.jsonl").read_text().splitlines()]
    write_jsonl(grpo_log, [{"step": r["step"], "entropy": r["entropy"], "reward": 1.0 - r["nll"] / psft[0]["nll"],
                            "rewards/arithmetic/mean": r["loss"]} for r in psft])
    (tmp_path / "broken.json").write_text("{not json")
    eval_doc = stages / "eval" / "eval.json"
    out = write_report([StageResult("base"), StageResult("sft", metrics=stages / "sft" / "metrics.jsonl"),
                        StageResult("psft", eval=eval_doc, metrics=stages / "psft" / "metrics.jsonl"),
                        StageResult("dpo", eval=tmp_path / "broken.json", metrics=tmp_path / "missing.jsonl"),
                        StageResult("grpo", metrics=grpo_log, parent="psft")], tmp_path / "r" / "report.html")
    html = out.read_text()
    assert re.findall(r'<figure id="fig-([a-z-]+)"', html) == ["accuracy", "id-vs-ood", "entropy",
                                                               "training-entropy", "reward-curve"]
    assert "dpo eval: cannot read" in html and "dpo metrics: cannot read" in html
    dom = rendered(out, tmp_path)
    assert len(dom.images) == 5 and all(img.get("data-ok") == "1" for img in dom.images)

    empty = write_report([StageResult("only", eval=tmp_path / "nothing.json")], tmp_path / "empty.html")
    text = empty.read_text()
    assert "<img" not in text and "only eval: cannot read" in text and "no evaluation results" in text
    assert text.count("omitted") == 5


def test_report_draws_the_stages_in_the_order_they_trained_and_names_the_run(stages, tmp_path, tiny_model_dir):
    """The evaluate stage at the end of psft → dpo → grpo (an order neither alphabetical nor candidate-first):
    both curves put the stages on the step axis in that order, and the title is the pipeline run's."""
    psft = [json.loads(ln) for ln in (stages / "psft" / "metrics.jsonl").read_text().splitlines()]
    logs = {"psft": stages / "psft" / "metrics.jsonl", "dpo": tmp_path / "dpo.jsonl", "grpo": tmp_path / "grpo.jsonl"}
    write_jsonl(logs["dpo"], [{"step": s, "loss": 0.7 / s, "entropy": psft[-1]["entropy"] - 0.01 * s}
                              for s in range(1, 7)])
    write_jsonl(logs["grpo"], [{"step": s, "entropy": psft[-1]["entropy"] - 0.02 * s, "reward": 0.1 * s,
                                "rewards/arithmetic/mean": 0.1 * s} for s in range(1, 6)])
    cfg = from_mapping(EvaluateConfig, {
        "model": str(stages / "psft" / "model"), "name": "grpo", "run_name": "posttrain-demo 5f0c2a9e",
        "output_dir": str(tmp_path / "eval"),
        "baselines": {"base": str(tiny_model_dir), "psft": str(stages / "psft" / "model"),
                      "dpo": str(stages / "sft" / "model")},
        "parents": {"psft": "base", "dpo": "psft", "grpo": "dpo"},
        "suites": [{"task": "arithmetic", "split": "id", "n_prompts": 4}], "max_new_tokens": 4,
        "bootstrap_samples": 50, "teacher_forced": False, "training_metrics": {k: str(v) for k, v in logs.items()}})
    dom = rendered(Path(run_evaluate(cfg)["report"]), tmp_path)
    assert all(img.get("data-ok") == "1" for img in dom.images), dom.images
    for fid, caption in (("training-entropy", "Entropy over training steps"), ("reward-curve", "Reward curve")):
        assert dom.text[f"fig-{fid} caption"] == dom.text[f"fig-{fid} alt"] == f"{caption} (psft → dpo → grpo)"
    assert dom.text["title"] == dom.text["h1"] == "posttrain-demo · run 5f0c2a9e"


def test_a_stage_starts_on_the_step_axis_where_the_model_it_trained_from_ended(tmp_path):
    """A chain (psft → dpo) continues the axis; a branch (a second recipe from psft, or a stage from base) starts
    where its own parent ended, and the caption says which."""
    logs = {}
    for name, steps in (("psft", 10), ("dpo", 4), ("grpo", 6), ("sft", 3)):
        logs[name] = tmp_path / f"{name}.jsonl"
        write_jsonl(logs[name], [{"step": s, "entropy": 1.0} for s in range(1, steps + 1)])
    c = collect([StageResult("psft", metrics=logs["psft"], parent="base"),
                 StageResult("dpo", metrics=logs["dpo"], parent="psft"),
                 StageResult("grpo", metrics=logs["grpo"], parent="psft"),
                 StageResult("sft", metrics=logs["sft"], parent="base")])
    assert c.step_axis() == [(0, "psft"), (10, "dpo"), (10, "grpo"), (0, "sft")]
    assert c.order() == "psft → dpo | grpo (from psft) | sft (from base)"
    unsaid = collect([StageResult(n, metrics=logs[n]) for n in ("psft", "dpo")])  # no parents given: one chain
    assert unsaid.step_axis() == [(0, "psft"), (10, "dpo")] and unsaid.order() == "psft → dpo"
