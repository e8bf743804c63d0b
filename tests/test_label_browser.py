"""The labelling widget and the volume viewer in a real browser: a JupyterLab server (127.0.0.1, a free port, a
token, a temporary folder) driven by Playwright's sync API with the system's chromium. A polygon drawn with mouse
events on `LabelWidget`'s canvas must give the mask `polygon_mask` computes for the same vertices, and moving
`VolumeViewer`'s slider must change the image. Skips when chromium or playwright is missing, except under CI (env var
CI set), where it fails: tools/test.sh installs both."""
import json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import nbformat, pytest

CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync']

# The notebook the browser runs. Cell 0: a LabelWidget on a phantom slice (6 screen pixels per voxel) and the canvas
# positions of the polygon's vertices (`to_canvas`), written for the test. Cell 1: a VolumeViewer. Cell 2 (run after
# the mouse work): what the kernel saw.
VERTS = [(10.3, 8.6), (50.2, 14.1), (40.7, 52.4), (12.5, 44.0)]
CELLS = [f'''import json, os
import numpy as np
from scipy import ndimage
from fsmis.data.phantom import make_phantom
from fsmis.label import LabelWidget, polygon_mask
from fsmis.viz import VolumeViewer
case = make_phantom(0, shape=(8, 64, 64))
w = LabelWidget(case.image, slice_index=4, zoom=6)
verts = {VERTS!r}
with open('points.tmp', 'w') as f: json.dump([w.to_canvas(x, y) for x, y in verts], f)
os.replace('points.tmp', 'points.json')
w''',
'''v = VolumeViewer(case, zoom=4, slice_index=3)
v''',
'''m = w.mask[4] == 1
ideal = polygon_mask(verts, m.shape)
band = ndimage.binary_dilation(ideal) & ~ndimage.binary_erosion(ideal)   # pixels within 1 pixel of the ideal boundary
lv = w.last_vertices
res = dict(vertices=None if lv is None else lv.tolist(), n=int(m.sum()), n_ideal=int(ideal.sum()),
           exact=bool(lv is not None and (m == polygon_mask(lv, m.shape)).all()),
           n_diff=int((m ^ ideal).sum()), diff_on_boundary=bool(not ((m ^ ideal) & ~band).any()),
           slider=int(v.slider.value), renders=int(v.renders))
with open('result.tmp', 'w') as f: json.dump(res, f)
os.replace('result.tmp', 'result.json')''']


def _needs_browser():
    exe = next((shutil.which(n) for n in ('chromium', 'chromium-browser') if shutil.which(n)), None)
    if exe is None and Path('/usr/bin/chromium').is_file(): exe = '/usr/bin/chromium'
    try: from playwright.sync_api import sync_playwright
    except ImportError: sync_playwright = None
    try: import jupyterlab, ipympl  # noqa: F401
    except ImportError: jupyterlab = None
    if exe is None or sync_playwright is None or jupyterlab is None:
        msg = 'chromium, playwright or jupyterlab is missing (tools/test.sh installs chromium with apt-get, the rest with the dev extras)'
        if os.environ.get('CI'): pytest.fail(msg + ' -- required under CI')
        pytest.skip(msg)
    return exe, sync_playwright


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def _wait_file(p: Path, timeout: float, what: str, proc=None):
    t0 = time.time()
    while not p.is_file():
        if proc is not None and proc.poll() is not None: raise RuntimeError(f'jupyter lab exited ({proc.returncode}) while waiting for {what}')
        if time.time() - t0 > timeout: raise TimeoutError(f'{what}: not written within {timeout:.0f} s')
        time.sleep(0.2)
    return json.loads(p.read_text())


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on 127.0.0.1 (free port, token) serving `tmp_path/work`; stopped (with its kernels) afterwards."
    work = tmp_path/'work'; work.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    nbformat.write(nb, work/'label.ipynb')
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path/'config'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'runtime'),
           'JUPYTERLAB_SETTINGS_DIR': str(tmp_path/'settings'), 'JUPYTERLAB_WORKSPACES_DIR': str(tmp_path/'workspaces'),
           'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}',
           '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={work}',
           '--LabApp.expose_app_in_browser=True', '--LabApp.news_url=', '--ServerApp.open_browser=False',
           '--ServerApp.terminals_enabled=False'] + (['--allow-root'] if os.geteuid() == 0 else [])
    log = open(tmp_path/'lab.log', 'w')
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f'http://127.0.0.1:{port}'
        t0 = time.time()
        while True:
            try:
                with urllib.request.urlopen(f'{url}/api/status?token={token}', timeout=2) as r:
                    if r.status == 200: break
            except OSError: pass
            if proc.poll() is not None or time.time() - t0 > 60:
                raise RuntimeError(f'jupyter lab did not start: {(tmp_path/"lab.log").read_text()[-2000:]}')
            time.sleep(0.3)
        yield dict(url=url, token=token, work=work, proc=proc)
    finally:
        proc.send_signal(signal.SIGINT); time.sleep(0.3); proc.send_signal(signal.SIGINT)  # jupyter asks to confirm once
        try: proc.wait(15)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)
        try: os.killpg(proc.pid, signal.SIGKILL)  # a kernel left behind in the session
        except ProcessLookupError: pass
        log.close()


def _run_cell(page, i: int):
    "Run cell `i` of the open notebook (JupyterLab's own command, through the app it exposes)."
    page.evaluate("""i => { const nb = window.jupyterapp.shell.currentWidget;
                          nb.content.activeCellIndex = i; return window.jupyterapp.commands.execute('notebook:run-cell'); }""", i)


def test_draw_polygon_and_move_slider(lab, tmp_path):
    exe, sync_playwright = _needs_browser()
    from fsmis.label import polygon_mask
    t0 = time.time()
    with sync_playwright() as p:
        # a fresh profile folder (--user-data-dir) of this test's own
        b = p.chromium.launch_persistent_context(str(tmp_path/'chromium-profile'), executable_path=exe, headless=True,
                                                 args=CHROMIUM_ARGS, viewport={'width': 1400, 'height': 1100})
        step = 'open the notebook'
        try:
            page = b.pages[0] if b.pages else b.new_page()
            page.goto(f"{lab['url']}/lab/tree/label.ipynb?token={lab['token']}")
            page.wait_for_function("""() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                return k && k.status === 'idle' && w.content && w.content.widgets.length === 3; }""", timeout=60_000)
            step = 'run the LabelWidget cell'
            no_news = page.get_by_role('button', name='No', exact=True)   # JupyterLab's "get notified about news?" toast
            if no_news.count(): no_news.first.click()
            _run_cell(page, 0)
            points = _wait_file(lab['work']/'points.json', 60, 'the canvas positions of the vertices', lab['proc'])
            _run_cell(page, 1)
            cells = page.locator('.jp-Notebook .jp-Cell')
            canvas = cells.nth(0).locator('.jupyter-matplotlib-canvas-div').first
            canvas.wait_for(state='visible', timeout=60_000)
            viewer_img = cells.nth(1).locator('.jp-OutputArea-output img').first
            viewer_img.wait_for(state='visible', timeout=60_000)
            status = cells.nth(0).locator('.widget-html-content', has_text='slice 4:').first
            status.wait_for(timeout=60_000)
            step = 'draw the polygon'
            canvas.scroll_into_view_if_needed()
            box = canvas.bounding_box()
            # the polygon: a click on each vertex, then on the first one again to close it
            # (pauses let each move reach the kernel first: the selector closes the polygon only when the pointer has
            # been seen on the first vertex before the last click)
            for cx, cy in points + points[:1]:
                page.mouse.move(box['x'] + cx, box['y'] + cy, steps=4)
                page.wait_for_timeout(300)
                page.mouse.down(); page.wait_for_timeout(80); page.mouse.up()
                page.wait_for_timeout(300)
            page.wait_for_function("el => !/class 1: 0 px/.test(el.textContent)", arg=status.element_handle(), timeout=60_000)
            # the viewer: drag its slider handle to the right; the image must change
            step = 'move the viewer slider'
            viewer_img.scroll_into_view_if_needed()
            before = viewer_img.screenshot()
            handle = cells.nth(1).locator('.widget-slider .noUi-handle').first
            hb = handle.bounding_box()
            page.mouse.move(hb['x'] + hb['width'] / 2, hb['y'] + hb['height'] / 2)
            page.mouse.down(); page.mouse.move(hb['x'] + hb['width'] / 2 + 120, hb['y'] + hb['height'] / 2, steps=8); page.mouse.up()
            page.wait_for_timeout(1500)
            after = viewer_img.screenshot()
            step = 'read the result'
            _run_cell(page, 2)
            res = _wait_file(lab['work']/'result.json', 60, 'the kernel-side result', lab['proc'])
        except Exception as e:
            page.screenshot(path=str(tmp_path/'failure.png'))
            raise AssertionError(f'browser step {step!r} failed (screenshot {tmp_path/"failure.png"}): {e}') from e
        finally:
            b.close()
    # the mask is exactly polygon_mask of the vertices the selector received; those are the intended vertices up to the
    # rounding of the mouse position to whole screen pixels (1/6 of an image pixel here), so against polygon_mask of the
    # intended vertices only pixels on the boundary (within 1 pixel of it) may differ
    assert res["vertices"] is not None, res
    assert len(res['vertices']) == len(VERTS)
    for (x, y), (x0, y0) in zip(res['vertices'], VERTS): assert abs(x - x0) <= 0.5 and abs(y - y0) <= 0.5, res['vertices']
    assert res['exact'], res
    assert res['n'] == polygon_mask(res['vertices'], (64, 64)).sum() and res['n'] > 500, res
    assert res['diff_on_boundary'], res
    assert res['slider'] > 3 and res['renders'] > 1, res
    assert before != after, 'the viewer image did not change when its slider moved'
    assert time.time() - t0 < 110
