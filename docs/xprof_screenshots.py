"""Screenshots of a simulated step in XProf beside the real v6e capture (docs/xprof_*.png).

    pip install '.[test]' selenium && apt-get install -y chromium chromium-driver
    python docs/xprof_screenshots.py

Simulates fsdp_70b on v5e:16x16 with ``tpusim run --out``, puts the real capture
(traces/real/tpu-v6e-host-offload/tpu_inference_2.xplane.pb) in the same log directory as a second run,
serves it with XProf's own web server on 127.0.0.1 only, and has headless Chromium (a fresh profile,
no network services) load each tool page and take a picture; the trace viewer's "Expand All" and the
op profile's first program are clicked first. XProf's pages come from the pip package: nothing is
fetched from the internet.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "traces" / "real" / "tpu-v6e-host-offload" / "tpu_inference_2.xplane.pb"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1000"]
# XProf's web server without its gRPC worker service (only for distributed processing; it would listen
# on every interface), bound to the loopback address.
SERVER = """
import sys
from xprof import server as s
ctx = s.TBContext(sys.argv[1], s.DataProvider(sys.argv[1]), s.TBContext.Flags(False))
ctx.hide_capture_profile_button, ctx.enable_tab_name_label, ctx.src_prefix = True, False, None
s.run_server(s.ProfilePluginLoader().load(ctx), "127.0.0.1", int(sys.argv[2]))
"""
SHOTS = {  # file -> (run, host, tool)
    "xprof_trace_viewer_simulated.png": ("tpusim", "simulated", "trace_viewer@"),
    "xprof_trace_viewer_v6e.png": ("v6e_capture", "tpu_inference_2", "trace_viewer@"),
    "xprof_op_profile_simulated.png": ("tpusim", "simulated", "op_profile"),
    "xprof_op_profile_v6e.png": ("v6e_capture", "tpu_inference_2", "op_profile"),
}
# Clicked before the picture, in a 1600 px wide window: the trace viewer's "Expand All" button, and the
# op profile's first program (to show its categories).
CLICK_XY = {"trace_viewer@": (824, 134), "op_profile": (976, 392)}


def browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        opts.add_argument(flag)
    opts.binary_location = shutil.which("chromium")
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--out", default=str(REPO / "docs"))
    ap.add_argument("--wait", type=float, default=12.0, help="seconds a page gets to load before the picture")
    args = ap.parse_args()
    logdir = Path(tempfile.mkdtemp(prefix="tpusim-xprof-"))
    subprocess.run([sys.executable, "-m", "tpusim", "run", str(REPO / "workloads" / "fsdp_70b.yaml"),
                    "--topology", "16x16", "--out", str(logdir)], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    (logdir / "plugins" / "profile" / "v6e_capture").mkdir(parents=True)
    shutil.copy(REAL, logdir / "plugins" / "profile" / "v6e_capture" / REAL.name)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(logdir), str(args.port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = None
    try:
        base = f"http://127.0.0.1:{args.port}"
        for _ in range(120):
            try:
                urllib.request.urlopen(base + "/", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        driver = browser()
        for name, (run, host, tool) in SHOTS.items():
            url = f"{base}/?run={run}&tool={tool}&host={host}"
            driver.get(url)
            time.sleep(args.wait)
            if tool in CLICK_XY:
                from selenium.webdriver.common.actions.action_builder import ActionBuilder

                click = ActionBuilder(driver)
                click.pointer_action.move_to_location(*CLICK_XY[tool]).click()
                click.perform()
                time.sleep(args.wait / 2)
            driver.save_screenshot(str(Path(args.out) / name))
            print("wrote", Path(args.out) / name, "from", url)
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
