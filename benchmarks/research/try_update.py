"""Quick check: validation perplexity of a configuration, with and without the OBS update."""
import sys, time, json, torch
torch.set_num_threads(2)
from pathlib import Path
from hybridprune.cli.common import configure_torch
configure_torch()
from hybridprune.models import load_model
from hybridprune.cache import StatsCache
from hybridprune.calibration.session import CalibrationRequest, calibrated_statistics, calibration_windows
from hybridprune.config import PruneConfig
from hybridprune.prune import prune_model
from hybridprune.reporting import SilentReporter
from hybridprune.data import load_text, tokenize, eval_windows
from hybridprune.evaluate import perplexity
root = Path("/tmp/hpcache")
windows_n = int(sys.argv[1])
configs = [json.loads(a) for a in sys.argv[2:]]
loaded = load_model(None, cache_dir=root)
req = CalibrationRequest()
stats = calibrated_statistics(loaded, req, StatsCache(root), SilentReporter()).stats
val = eval_windows(tokenize(load_text("wiki-vital", "validation"), loaded.tokenizer, root / "tokens"), 512, windows_n)
for cfg in configs:
    loaded = load_model(None, cache_dir=root)
    config = PruneConfig(**cfg).validate()
    t = time.time()
    w = calibration_windows(loaded, req, root)[0] if config.update else None
    prune_model(loaded, stats, config, SilentReporter(), update_windows=w)
    pt = time.time() - t
    ppl = perplexity(loaded.model, val, 1, SilentReporter()).ppl
    print(json.dumps({"cfg": cfg, "val_ppl": round(ppl, 3), "windows": windows_n, "prune_s": round(pt, 1)}), flush=True)
