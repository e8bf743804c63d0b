"""The offline docs site (tools/build_docs.py): one page per notebook, every page reachable from the home page's
navigation, sidebar order and error reporting, and the pages as headless Chromium renders them (title, navigation,
not blank). Chromium tests skip when chromium is missing, except under CI (env var CI set), where they fail:
tools/test.sh installs it."""
import importlib.util, json, os, shutil, subprocess, sys
from pathlib import Path
from urllib.parse import urlsplit

import nbformat, numpy as np, pytest
from bs4 import BeautifulSoup
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _load_build_docs():
    spec = importlib.util.spec_from_file_location('build_docs', ROOT/'tools'/'build_docs.py')
    mod = importlib.util.module_from_spec(spec)
    sys.modules['build_docs'] = mod   # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod

bd = _load_build_docs()


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """The site of the repository's notebooks: (folder, pages). Built into a fresh folder, unless FSMIS_DOCS_SITE names
    a site that tools/test.sh has just built (its pages must match the notebooks' navigation)."""
    pages = bd.site_pages(ROOT/'nbs')
    given = os.environ.get('FSMIS_DOCS_SITE')
    if given and (Path(given)/'pages.json').is_file():
        out = Path(given).resolve()
        built = json.loads((out/'pages.json').read_text())
        assert [m['notebook'] for m in built] == [p.nb.as_posix() for p in pages], f'{out} is stale: rebuild it'
        newest = max((ROOT/'nbs'/p.nb).stat().st_mtime for p in pages)
        assert (out/'pages.json').stat().st_mtime >= newest, f'{out} is older than the notebooks: rebuild it'
        for p, m in zip(pages, built): p.title = m['title']
        return out, pages
    out = tmp_path_factory.mktemp('docs')/'_site'
    return out, bd.build(out, ROOT/'nbs')


def _nav_targets(page_file: Path) -> list[Path]:
    "Files that the sidebar navigation links of `page_file` point to (resolved)."
    soup = BeautifulSoup(page_file.read_text(encoding='utf-8'), 'html.parser')
    nav = soup.select_one('nav.sidebar')
    assert nav is not None, f'{page_file.name}: no sidebar navigation'
    return [(page_file.parent/urlsplit(a['href']).path).resolve() for a in nav.find_all('a', href=True)]


# ---- the site's structure -----------------------------------------------------------------------------------------

def test_one_page_per_notebook(site):
    out, pages = site
    nbs = bd.find_notebooks(ROOT/'nbs')
    assert {p.nb for p in pages} == set(nbs), 'every notebook gets exactly one page'
    for nb in nbs:
        page = out/bd.page_name(nb)
        assert page.is_file(), f'no page for nbs/{nb}'
        assert '<h1 class="title">' in page.read_text(encoding='utf-8')
    assert (out/'index.html').is_file() and (out/'core.html').is_file() and (out/'site.css').is_file()
    manifest = json.loads((out/'pages.json').read_text())
    assert [m['page'] for m in manifest] == [p.html.as_posix() for p in pages]


def test_every_page_reachable_from_home(site):
    out, pages = site
    targets = _nav_targets(out/'index.html')
    expected = [(out/p.html).resolve() for p in pages]
    assert targets == expected, 'home navigation lists every page, in sidebar order'
    for p in pages:   # every page (tutorials/ too) carries the same working navigation and a prev/next pager
        f = out/p.html
        assert _nav_targets(f) == expected, f'{p.html}: navigation differs from the home page'
        soup = BeautifulSoup(f.read_text(encoding='utf-8'), 'html.parser')
        pager = soup.select('nav.pager a[href]')
        assert pager, f'{p.html}: no previous/next link'
        for a in pager: assert (f.parent/urlsplit(a['href']).path).resolve().is_file()


def test_sidebar_order_followed(site):
    _, pages = site
    import yaml
    listed = [e for _, e in bd._sidebar_entries(yaml.safe_load((ROOT/'nbs'/'sidebar.yml').read_text())['website']['sidebar']['contents'], None, [])]
    got = [p.nb.as_posix() for p in pages]
    present = [e for e in listed if (ROOT/'nbs'/e).exists()]
    assert got[:len(present)] == present


def test_api_reference_and_figures(site):
    out, _ = site
    core = BeautifulSoup((out/'core.html').read_text(encoding='utf-8'), 'html.parser')
    entries = {d['id'] for d in core.select('div.api-entry')}
    assert {'case', 'set_seed', 'data_root', 'atomic_write'} <= entries
    case = core.select_one('div.api-entry#case')
    assert 'spacing' in case.get_text() and 'One 3D scan in memory' in case.get_text()  # signature + docstring
    assert '#| export' not in core.get_text() and 'np.random.seed(seed' not in core.get_text(), 'exported code replaced by its API entry'
    assert 'from nbdev.showdoc import' not in core.get_text(), '#| hide cells dropped'
    if (out/'viz.html').exists():
        viz = BeautifulSoup((out/'viz.html').read_text(encoding='utf-8'), 'html.parser')
        assert len(viz.select('div.output-image img[src^="data:image/png;base64,"]')) >= 4, 'stored figures embedded'
        assert viz.select_one('div.api-entry#volumeviewer') is not None


# ---- sidebar rules and errors, on a small notebook folder ---------------------------------------------------------

def _nb(path: Path, *cells):
    nb = nbformat.v4.new_notebook()
    nb.metadata = {'kernelspec': {'display_name': 'python3', 'language': 'python', 'name': 'python3'}}
    for c in cells:
        if not c.startswith('code:'): nb.cells.append(nbformat.v4.new_markdown_cell(c)); continue
        src, _, out = c[5:].partition('\n->')   # 'code:SOURCE\n->STORED STDOUT'
        cell = nbformat.v4.new_code_cell(src)
        if out: cell.outputs = [nbformat.v4.new_output('stream', name='stdout', text=out)]
        nb.cells.append(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))

@pytest.fixture
def mini_nbs(tmp_path):
    nbs = tmp_path/'nbs'
    _nb(nbs/'index.ipynb', '# Mini\n> a small site', 'See [the second page](02_b.ipynb) and [a tutorial](tutorials/t.ipynb).')
    _nb(nbs/'02_b.ipynb', '# Bee\n> second', '## Part', 'code:#| hide\nsecret = 1', 'code:x = 1\nx',
        'code:#| echo: false\nprint("only output")\n->only output\n', 'Math stays $a_i + b_i$ and `code_x`.',
        '::: {.callout-note}\nA *quarto* callout.\n:::')
    _nb(nbs/'01_a.ipynb', '# Ay')
    _nb(nbs/'tutorials'/'t.ipynb', '# Tut', 'Back [home](../index.ipynb).')
    _nb(nbs/'_private.ipynb', '# hidden from the site')
    (nbs/'sidebar.yml').write_text('website:\n  sidebar:\n    contents:\n      - index.ipynb\n      - 02_b.ipynb\n'
                                  '      - section: Later\n        contents:\n          - 99_missing.ipynb\n          - 01_a.ipynb\n')
    (nbs/'nbdev.yml').write_text('website:\n  title: "minisite"\n  description: "tiny"\n')
    return nbs

def test_sidebar_rules(mini_nbs, tmp_path):
    pages = bd.build(tmp_path/'site', mini_nbs)
    assert [p.nb.as_posix() for p in pages] == ['index.ipynb', '02_b.ipynb', '01_a.ipynb', 'tutorials/t.ipynb']
    assert [p.section for p in pages] == [None, None, 'Later', 'More']   # missing skipped, unlisted appended
    assert [p.html.as_posix() for p in pages] == ['index.html', 'b.html', 'a.html', 'tutorials/t.html']
    site = tmp_path/'site'
    home = (site/'index.html').read_text()
    assert 'href="b.html"' in home and 'href="tutorials/t.html"' in home   # .ipynb links rewritten
    assert 'minisite</title>' in home
    b = BeautifulSoup((site/'b.html').read_text(), 'html.parser').select_one('main').get_text()
    assert 'secret' not in b and 'x = 1' in b and 'only output' in b and 'print(' not in b
    assert '$a_i + b_i$' in b, 'math kept verbatim'
    assert ':::' not in b and '<div class="callout-note">' in (site/'b.html').read_text(), 'quarto callouts become divs'
    t = (site/'tutorials'/'t.html').read_text()
    assert 'href="../index.html"' in t and 'href="../site.css"' in t


def test_unrenderable_notebook_fails_clearly(mini_nbs, tmp_path, capsys):
    (mini_nbs/'03_broken.ipynb').write_text('{ not json')
    out = tmp_path/'site'
    assert bd.main(['--nbs', str(mini_nbs), '--out', str(out), '-q']) == 1
    err = capsys.readouterr().err
    assert '03_broken.ipynb' in err and 'cannot read' in err
    assert not out.exists(), 'no half-built site left behind'


def test_missing_export_fails_clearly(mini_nbs, tmp_path):
    _nb(mini_nbs/'04_c.ipynb', '# C', 'code:#| default_exp core', 'code:#| export\ndef not_in_module(): pass')
    with pytest.raises(bd.BuildError, match='not_in_module.*missing from module fsmis.core'): bd.build(tmp_path/'s', mini_nbs)


# ---- the pages in a real browser ----------------------------------------------------------------------------------

def _chromium():
    exe = next((shutil.which(n) for n in ('chromium', 'chromium-browser', 'google-chrome') if shutil.which(n)), None)
    if exe is None:
        msg = 'chromium is not installed (tools/test.sh installs it: apt-get install chromium)'
        if os.environ.get('CI'): pytest.fail(msg + ' -- required under CI')
        pytest.skip(msg)
    return exe

def _browse(tmp_path, url, *args):
    exe = _chromium()
    prof = Path(tmp_path)/f'profile{len(list(Path(tmp_path).glob("profile*")))}'
    cmd = [exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
           '--no-first-run', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
           '--hide-scrollbars', f'--user-data-dir={prof}', *args, url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f'chromium failed ({r.returncode}): {r.stderr[-2000:]}'
    return r.stdout

@pytest.mark.parametrize('page', ['index.html', 'core.html'])
def test_page_in_chromium(site, tmp_path, page):
    out, pages = site
    url = (out/page).resolve().as_uri()
    title = bd.site_config(ROOT/'nbs')['title']
    dom = BeautifulSoup(_browse(tmp_path, url, '--dump-dom'), 'html.parser')
    assert title in dom.title.get_text()
    assert dom.select_one('header .site-title').get_text() == title
    assert len(dom.select('nav.sidebar a[href]')) == len(pages)
    assert dom.select_one('main h1.title').get_text().strip()
    shot = tmp_path/f'{page}.png'
    _browse(tmp_path, url, f'--screenshot={shot}', '--window-size=1280,900')
    im = Image.open(shot).convert('RGB')
    assert im.size == (1280, 900)
    a = np.asarray(im)
    non_white = (a.min(-1) < 235).mean()
    colours = len(np.unique(a.reshape(-1, 3), axis=0))
    assert non_white > 0.08, f'{page}: looks blank ({non_white:.1%} non-white pixels)'
    assert colours > 100, f'{page}: only {colours} distinct colours'
    r, g, b = im.getpixel((640, 8))           # the site-title bar across the top
    assert b > 150 and r < 100, f'{page}: no title bar at the top (pixel {(r, g, b)})'
    assert a[60:400, :240].min() < 100, f'{page}: sidebar navigation not drawn'   # dark text in the sidebar
