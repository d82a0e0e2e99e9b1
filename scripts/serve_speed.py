"""The race page's tokens/s per column, read from the page in headless chromium, to set beside `rqlm bench`'s.

    python scripts/serve_speed.py RUN_DIR [--prompt_length 64] [--new_tokens 128] [--races 3] [--corpus_prompt]
        [--screenshot PNG]

Serves RUN_DIR's demo models (baseline, lm, lm_codes; lm drafting) as `rqlm serve` does, greedy, a prompt of
exactly --prompt_length tokens of English text; races --races times and prints each column's median tokens/s,
time to first token and new tokens as the page shows them. docs/results/serve.md has the figures.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from rqlm.drafting.speed import held_out_prompts
from rqlm.serve import demo_lineup, load_lineup
from rqlm.serve.page import build_page, launch_page

TEXT = ("The history of the city begins with a small settlement on the river, where traders from the north and "
        "the south met to exchange grain, salt and cloth. Over the following centuries the settlement grew into a "
        "market town, and later into a busy port with a university, a cathedral and a railway station that "
        "connected it to the capital. Today it is known for its old bridges and its long summer festival.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--races", type=int, default=3)
    parser.add_argument("--screenshot", default=None)
    parser.add_argument("--corpus_prompt", action="store_true",
                        help="race on the first prompt `rqlm bench --drafting` drafts on (an embedded held-out document)")
    args = parser.parse_args()

    loaded = load_lineup(demo_lineup(args.run_dir))
    if args.corpus_prompt:
        ids = held_out_prompts(loaded.tokenizer, 1, args.prompt_length)[0][0].tolist()
    else:
        ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"][: args.prompt_length]
    prompt = loaded.tokenizer.decode(ids)
    assert loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids, "the prompt must round-trip"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page = build_page(loaded)
    launch_page(page, port=port, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1300"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    figures = [[] for _ in loaded.contenders]
    try:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 600)
        field = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        field.send_keys(prompt)
        tokens = browser.find_element(By.CSS_SELECTOR, "#max-new-tokens input")
        tokens.send_keys(Keys.CONTROL, "a")
        tokens.send_keys(str(args.new_tokens))
        for race in range(args.races):
            browser.find_element(By.ID, "race").click()
            wait.until(lambda d: "running" in d.find_element(By.ID, "status").text)
            wait.until(lambda d: "finished" in d.find_element(By.ID, "status").text)
            for i, column in enumerate(figures):
                text = browser.find_element(By.ID, f"stats-{i}").text
                speed = float(re.search(r"([\d,.]+) tokens/s", text).group(1).replace(",", ""))
                column.append((speed, text))
            print(f"race {race + 1}: " + " | ".join(column[-1][1] for column in figures), flush=True)
        if args.screenshot:
            browser.save_screenshot(args.screenshot)
    finally:
        browser.quit()
        page.close()
    print(f"prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, greedy, {args.races} races: median tokens/s")
    for contender, column in zip(loaded.contenders, figures):
        print(f"  {contender.name}: {statistics.median(speed for speed, _ in column):,.1f}")


if __name__ == "__main__":
    main()
