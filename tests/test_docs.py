"""The offline docs site (tools/build_docs.py: Sphinx + MyST-NB + Furo): one page per notebook of nbs/sidebar.yml,
navigation in its order, no broken internal link, nothing loaded from the network, an API reference with parameter
docs and [source] links; and, in headless Chromium (Playwright driving the system's chromium): search, rendered
math, no sideways scrolling and a working menu at 400 px. Browser tests skip when chromium or playwright is missing,
except under CI (env var CI set), where they fail: tools/test.sh installs both."""
import importlib.util, json, os, re, shutil, sys
from pathlib import Path
from urllib.parse import urlsplit, unquote

import nbformat, pytest, yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'

def _load_build_docs():
    spec = importlib.util.spec_from_file_location('build_docs', ROOT/'tools'/'build_docs.py')
    mod = importlib.util.module_from_spec(spec)
    sys.modules['build_docs'] = mod
    spec.loader.exec_module(mod)
    return mod

bd = _load_build_docs()


def _listed(nbs=NBS):
    "Notebooks named in sidebar.yml, in order, with their section (read here independently of the builder)."
    res = []
    def walk(items, sec):
        for e in items if isinstance(items, list) else [items]:
            if isinstance(e, str): res.append((sec, e))
            elif isinstance(e, dict) and 'contents' in e: walk(e['contents'], e.get('section', sec))
            elif isinstance(e, dict) and ('href' in e or 'file' in e): res.append((sec, e.get('href') or e['file']))
    walk(yaml.safe_load((nbs/'sidebar.yml').read_text())['website']['sidebar']['contents'], None)
    return res

def _page(nb: str) -> str:
    "nbdev's page for a notebook (as Quarto names it)."
    from nbdev.frontmatter import nbpath2html
    return nbpath2html(Path(nb)).as_posix()

def _nb_with(pattern: str) -> str:
    "The listed notebook whose name matches `pattern` (notebooks may be renumbered)."
    hits = [nb for _, nb in _listed() if re.search(pattern, nb)]
    assert len(hits) == 1, f'expected one notebook matching {pattern!r} in sidebar.yml, got {hits}'
    return hits[0]


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    """The site of the repository's notebooks. Built into a fresh folder, unless FSMIS_DOCS_SITE names a site that
    tools/test.sh has just built (it must list the notebooks of today's sidebar and be newer than every notebook)."""
    given = os.environ.get('FSMIS_DOCS_SITE')
    pages = [(r.as_posix(), n + '.html') for r, n, _ in bd.site_pages(NBS)]
    if given and (Path(given)/'pages.json').is_file():
        out = Path(given).resolve()
        built = [(m['notebook'], m['page']) for m in json.loads((out/'pages.json').read_text())]
        assert built == pages, f'{out} is stale: rebuild it (python tools/build_docs.py)'
        newest = max(p.stat().st_mtime for p in NBS.rglob('*.ipynb'))
        assert (out/'pages.json').stat().st_mtime >= newest, f'{out} is older than the notebooks: rebuild it'
        return out
    out = tmp_path_factory.mktemp('docs')/'_site'
    bd.build(out, NBS)
    return out

def _soup(f: Path): return BeautifulSoup(f.read_text(encoding='utf-8'), 'html.parser')

def _html_files(site): return sorted(p for p in site.rglob('*.html'))


# ---- structure ----------------------------------------------------------------------------------------------------

def test_every_sidebar_notebook_has_a_page(site):
    listed = [nb for _, nb in _listed() if (NBS/nb).exists()]
    assert len(listed) >= 20
    for nb in ['index.ipynb', *listed]:
        f = site/_page(nb)
        assert f.is_file(), f'nbs/{nb} has no page {_page(nb)}'
        h1 = _soup(f).select_one('article h1')
        assert h1 is not None and h1.get_text(strip=True), f'{_page(nb)}: no title'


def test_navigation_follows_sidebar_yml(site):
    listed = [(sec, nb) for sec, nb in _listed() if (NBS/nb).exists() and nb != 'index.ipynb']
    expected = [(site/_page(nb)).resolve() for _, nb in listed]
    for f in [site/'index.html', site/_page(listed[-1][1])]:   # the home page and a page in a sub-folder
        soup = _soup(f)
        links = [(f.parent/unquote(urlsplit(a['href']).path)).resolve() if urlsplit(a['href']).path else f.resolve()
                 for a in soup.select('.sidebar-tree a.reference')]
        assert links[:len(expected)] == expected, f'{f.name}: navigation is not in sidebar.yml order'
        captions = [c.get_text(strip=True) for c in soup.select('.sidebar-tree p.caption')]
        assert captions == list(dict.fromkeys(sec for sec, _ in listed if sec)), 'sections as in sidebar.yml'


def _targets(f: Path):
    soup = _soup(f)
    for tag, attr in (('a', 'href'), ('img', 'src'), ('link', 'href'), ('script', 'src'), ('iframe', 'src'), ('source', 'src')):
        for el in soup.find_all(tag):
            if el.get(attr): yield tag, el[attr]

def test_no_broken_internal_link(site):
    ids, bad, n = {}, [], 0
    def ids_of(p):
        if p not in ids: ids[p] = {e['id'] for e in _soup(p).find_all(id=True)}
        return ids[p]
    for f in _html_files(site):
        for tag, url in _targets(f):
            u = urlsplit(url)
            if u.scheme or url.startswith('//'): continue
            target = (f.parent/unquote(u.path)).resolve() if u.path else f
            n += 1
            if not target.is_file(): bad.append(f'{f.relative_to(site)}: {url} (missing file)')
            elif u.fragment and target.suffix == '.html' and unquote(u.fragment) not in ids_of(target):
                bad.append(f'{f.relative_to(site)}: {url} (no such anchor)')
    assert n > 1000
    assert not bad, f'{len(bad)} broken links:\n' + '\n'.join(bad[:30])


def test_pages_load_nothing_from_the_network(site):
    "No script, stylesheet, image or frame from another host: the site works offline (MathJax is bundled)."
    ext = [f'{f.relative_to(site)}: <{tag}> {url}' for f in _html_files(site) for tag, url in _targets(f)
           if tag != 'a' and (urlsplit(url).scheme in ('http', 'https') or url.startswith('//'))]
    assert not ext, '\n'.join(ext[:20])
    assert (site/'_static'/'mathjax'/'tex-svg.js').is_file()
    for css in (site/'_static').rglob('*.css'):
        assert not re.search(r'url\(\s*[\'"]?(https?:)?//', css.read_text(errors='ignore')), f'{css.name} loads a remote file'


def test_favicon_and_repository_link(site):
    from nbdev.config import get_config
    repo = get_config(path=ROOT).git_url
    assert repo.startswith('https://')
    for f in _html_files(site):
        if '_modules' in f.parts: continue
        soup = _soup(f)
        icon = soup.find('link', rel='icon')
        assert icon is not None and (f.parent/icon['href']).is_file(), f'{f.name}: no favicon'
        assert soup.select(f'a[href="{repo}"]'), f'{f.name}: no link to the repository {repo}'


def test_api_reference(site):
    core = _soup(site/'core.html')
    entry = core.select_one('dt#fsmis\\.core\\.set_seed')
    assert entry is not None, 'set_seed documented where it is exported'
    sig = entry.get_text(' ', strip=True)
    assert 'seed : int = 0' in sig and 'deterministic' in sig, sig
    src = entry.select_one('a.viewcode-link') or entry.find_parent('dl').select_one('a[href*="_modules/"]')
    assert src is not None and '[source]' in src.get_text()
    assert (site/urlsplit(src['href']).path).is_file()
    body = entry.find_next_sibling('dd').get_text(' ', strip=True)
    assert 'Seed python, numpy and torch' in body and 'seed for python' in body, 'docstring and parameter comments'
    mods = [a['href'] for a in core.select('article a.reference.internal') if a.get_text() == 'fsmis.data.io']
    assert mods and mods[0].startswith(_page(_nb_with(r'data\.io'))), 'a `module` in the text links to its page'
    assert '#| export' not in core.get_text() and 'def set_seed' not in core.select_one('article').get_text(), 'code of exported cells hidden'
    adnet = _soup(site/_page(_nb_with(r'models\.adnet\.ipynb$'))).select_one('dt#fsmis\\.models\\.adnet\\.ADNet').find_next_sibling('dd')
    assert '-alpha*cos' in adnet.get_text(), 'a * in a docstring is kept, not read as emphasis'
    cfg = _soup(site/'config.html').select_one('dt#fsmis\\.config\\.cpu_budget_config').find_next_sibling('dd')
    fields = {li.get_text(' ', strip=True).split(' – ')[0]: li.get_text(' ', strip=True) for li in cfg.select('dl.field-list li')}
    assert 'ExperimentConfig' in fields.get('**kw', ''), f'**kw comment documents **kw: {fields}'
    for f in _html_files(site):
        art = _soup(f).select_one('article')
        if art is not None: assert 'NoneType' not in art.get_text(), f'{f.name}: a type shown as NoneType'


def test_directives_and_subtitles(site):
    for f in _html_files(site):
        art = _soup(f).select_one('article')
        if art is None or '_modules' in f.parts: continue
        code = '\n'.join(p.get_text() for p in art.select('div.cell_input pre'))
        assert not re.search(r'^\s*#\s*\|', code, re.M), f'{f.name}: an nbdev directive comment is shown'
        assert 'from nbdev.showdoc import' not in code, f'{f.name}: a #| hide cell is shown'
        lead = art.select_one('p.lead')
        if lead is not None: assert '`' not in lead.get_text(), f'{f.name}: literal backticks in the subtitle'
    cli = _soup(site/_page(_nb_with(r'cli\.ipynb$'))).select_one('article p.lead')
    assert cli is not None and cli.select('code'), 'the subtitle renders its `code`'


def test_figures_have_alt_text(site):
    n = 0
    for f in _html_files(site):
        art = _soup(f).select_one('article')
        for img in art.select('img') if art is not None else []:
            n += 1
            alt = (img.get('alt') or '').strip()
            assert len(alt) >= 15 and 'no description' not in alt.lower(), f'{f.name}: {img.get("src")} has alt {alt!r}'
    assert n >= 30


def test_install_instructions_agree():
    "The README (generated from nbs/index.ipynb) and the docs home give the same install commands."
    readme = re.findall(r'^.*pip install.*$', (ROOT/'README.md').read_text(), re.M)
    home = re.findall(r'^.*pip install.*$', '\n'.join(c.source for c in nbformat.read(NBS/'index.ipynb', 4).cells), re.M)
    assert readme and readme == home

def test_install_instructions_on_the_home_page(site):
    home = _soup(site/'index.html').select_one('article').get_text()
    for line in re.findall(r'^.*pip install.*$', (ROOT/'README.md').read_text(), re.M):
        if not line.startswith(('#', '>')): assert line.strip() in home


def _cli_subcommands():
    import argparse
    from fsmis.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)

def _cli_nb_has_help():
    nb = nbformat.read(NBS/_nb_with(r'cli\.ipynb$'), 4)
    txt = ''.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))
    return all(f'usage: fsmis {s}' in txt for s in _cli_subcommands())

def test_cli_page_shows_every_subcommands_help(site):
    assert _cli_nb_has_help(), "the CLI notebook must store each subcommand's --help output (execute it)"
    text = _soup(site/_page(_nb_with(r'cli\.ipynb$'))).select_one('article').get_text()
    missing = [s for s in _cli_subcommands() if not re.search(rf'usage: fsmis {s}\b', text)]
    assert not missing, f'no --help shown for: {missing}'


# ---- the builder on a small notebook folder -----------------------------------------------------------------------

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
    _nb(nbs/'index.ipynb', '# Mini\n> a `small` site', 'See [the second page](02_b.ipynb) and [a tutorial](tutorials/t.ipynb).')
    _nb(nbs/'02_b.ipynb', '# Bee\n> second', '## Part', 'code:#| hide\nsecret = 1', 'code:#| slow\nx = 1\nx',
        'code:#| echo: false\nprint("usage: fsmis demo [-h]")\n->usage: fsmis demo [-h]\n', 'Math $a_i + b_i$ and `code_x`.',
        '::: {.callout-note}\nA *quarto* callout.\n:::')
    _nb(nbs/'01_a.ipynb', '# Ay')
    _nb(nbs/'tutorials'/'t.ipynb', '# Tut', 'Back [home](../index.ipynb).')
    _nb(nbs/'_private.ipynb', '# hidden from the site')
    (nbs/'sidebar.yml').write_text('website:\n  sidebar:\n    contents:\n      - index.ipynb\n      - 02_b.ipynb\n'
                                  '      - section: Later\n        contents:\n          - 99_missing.ipynb\n          - 01_a.ipynb\n')
    return nbs

def test_builder_rules(mini_nbs, tmp_path):
    pages = bd.build(tmp_path/'site', mini_nbs)
    assert [(r.as_posix(), n, s) for r, n, s in pages] == [('index.ipynb', 'index', None), ('02_b.ipynb', 'b', None),
        ('01_a.ipynb', 'a', 'Later'), ('tutorials/t.ipynb', 'tutorials/t', 'More')]   # missing skipped, unlisted appended
    site = tmp_path/'site'
    home = _soup(site/'index.html')
    assert {'b.html', 'tutorials/t.html'} <= {a['href'] for a in home.select('article a[href]')}, '.ipynb links rewritten'
    assert home.select_one('p.lead code').get_text() == 'small'
    b = _soup(site/'b.html').select_one('article')
    text = b.get_text()
    assert 'secret' not in text and 'x = 1' in text and '#|' not in text, 'hidden cell dropped, directive comments stripped'
    assert 'usage: fsmis demo [-h]' in text and 'print(' not in text, 'echo: false shows the stored output only'
    assert b.select('span.math') and '$' not in text, 'dollar math handed to MathJax'
    assert b.select_one('div.admonition.note') is not None, 'Quarto callouts become admonitions'
    t = (site/'tutorials'/'t.html').read_text()
    assert 'href="../index.html"' in t


def test_unreadable_notebook_fails_clearly(mini_nbs, tmp_path, capsys):
    (mini_nbs/'03_broken.ipynb').write_text('{ not json')
    out = tmp_path/'site'
    assert bd.main(['--nbs', str(mini_nbs), '--out', str(out), '-q']) == 1
    err = capsys.readouterr().err
    assert '03_broken.ipynb' in err and 'cannot read' in err
    assert not out.exists(), 'no half-built site left behind'
    assert not list(tmp_path.glob('.site.*')), 'no temporary folder left behind'


def test_missing_export_fails_clearly(mini_nbs, tmp_path):
    _nb(mini_nbs/'04_c.ipynb', '# C', 'code:#| default_exp core', 'code:#| export\ndef not_in_module(): pass')
    with pytest.raises(bd.BuildError, match='not_in_module.*fsmis.core'): bd.build(tmp_path/'s', mini_nbs)


# ---- the pages in a real browser ----------------------------------------------------------------------------------

CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']

@pytest.fixture(scope='module')
def browser(tmp_path_factory):
    exe = next((shutil.which(n) for n in ('chromium', 'chromium-browser') if shutil.which(n)), None)
    try: from playwright.sync_api import sync_playwright
    except ImportError: sync_playwright = None
    if exe is None or sync_playwright is None:
        msg = 'chromium or playwright is missing (tools/test.sh installs chromium with apt-get, playwright with the dev extras)'
        if os.environ.get('CI'): pytest.fail(msg + ' -- required under CI')
        pytest.skip(msg)
    with sync_playwright() as p:   # launch() gives every run a fresh temporary profile
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        b.requests = []
        yield b
        b.close()

def _open(browser, f: Path, width=1280, height=900):
    page = browser.new_page(viewport={'width': width, 'height': height})
    page.errors = []
    page.on('request', lambda r: browser.requests.append(r.url))
    page.on('pageerror', lambda e: page.errors.append(str(e)))
    page.goto(f.resolve().as_uri())
    page.wait_for_load_state('load')
    return page

def test_search_finds_supervoxels_page(site, browser):
    page = _open(browser, site/'index.html')
    page.fill('.sidebar-drawer input[name="q"]', 'supervoxel')
    page.press('.sidebar-drawer input[name="q"]', 'Enter')
    page.wait_for_selector('#search-results ul.search li a', timeout=30_000)
    hrefs = [urlsplit(a.get_attribute('href')).path for a in page.query_selector_all('#search-results ul.search li a')]
    assert _page(_nb_with(r'supervoxels\.ipynb$')) in hrefs, hrefs
    assert not page.errors
    page.close()

def test_math_rendered_on_adnet_page(site, browser):
    page = _open(browser, site/_page(_nb_with(r'models\.adnet\.ipynb$')))
    page.wait_for_selector('article mjx-container svg', timeout=30_000)
    page.wait_for_function("document.querySelectorAll('article span.math').length === "
                           "document.querySelectorAll('article span.math mjx-container').length", timeout=30_000)
    raw = page.evaluate("""() => { const a = document.querySelector('article').cloneNode(true);
        a.querySelectorAll('pre, code, mjx-container, script, style').forEach(e => e.remove()); return a.innerText; }""")
    assert '$' not in raw and '\\(' not in raw, 'raw TeX left on the page'
    assert not page.errors
    page.close()

def test_phone_width_no_sideways_scroll_and_menu(site, browser):
    pages = [m['page'] for m in json.loads((site/'pages.json').read_text())]
    wide = []
    for p in pages:
        page = _open(browser, site/p, width=400, height=800)
        page.wait_for_timeout(50)
        sw, w = page.evaluate('[document.documentElement.scrollWidth, window.innerWidth]')
        if sw > w: wide.append(f'{p}: {sw}px wide')
        if p == pages[1]:   # the navigation is folded away, the content starts at the top, the menu opens it
            h1 = page.query_selector('article h1').bounding_box()
            assert h1['y'] < 200, f'{p}: content starts {h1["y"]}px down'
            nav = page.query_selector('.sidebar-drawer .sidebar-tree')
            assert not nav.is_visible() or nav.bounding_box()['x'] + nav.bounding_box()['width'] <= 0
            page.click('.mobile-header label[for="__navigation"]')
            page.wait_for_timeout(400)
            box = nav.bounding_box()
            assert nav.is_visible() and box['x'] >= 0 and box['width'] > 100, 'the menu button opens the navigation'
        assert not page.errors, f'{p}: {page.errors}'
        page.close()
    assert not wide, 'pages scroll sideways at 400px:\n' + '\n'.join(wide)

def test_browser_fetched_nothing_remote(site, browser):
    for f in [site/'index.html', site/_page(_nb_with(r'models\.adnet\.ipynb$')), site/'search.html']:
        page = _open(browser, f)
        page.wait_for_timeout(300)
        page.close()
    remote = [u for u in browser.requests if not u.startswith(('file:', 'data:', 'blob:', 'about:'))]
    assert browser.requests and not remote, remote[:10]


# ---- tables, signatures and the way in (issue 30) ---------------------------------------------------------------

_re_pipe_rule = re.compile(r'^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$')

def _rendered(art):
    "A copy of an <article> without the code of the cells (what the reader reads as text and outputs)."
    art = BeautifulSoup(str(art), 'html.parser')
    for e in art.select('div.cell_input, script, style'): e.decompose()
    return art

def test_no_raw_pipe_table(site):
    "Markdown tables, in prose, in markdown outputs or printed by a cell, render as HTML tables: no `|---|` line left."
    raw = []
    for f in _html_files(site):
        art = _soup(f).select_one('article')
        if art is None or '_modules' in f.parts: continue
        art = _rendered(art)
        raw += [f'{f.relative_to(site)}: {l.strip()[:80]}' for l in art.get_text('\n').splitlines() if _re_pipe_rule.match(l)]
        raw += [f'{f.relative_to(site)}: <p> {p.get_text()[:80]}' for p in art.select('p') if p.get_text().lstrip().startswith('|')]
    assert not raw, f'{len(raw)} raw pipe-table lines:\n' + '\n'.join(raw[:30])
    qs = _soup(site/_page(_nb_with(r'quick_start'))).select_one('article')
    assert qs.select('div.cell_output table'), "the quick start's Dice table (a markdown output) is an HTML table"
    abl = _soup(site/_page(_nb_with(r'tutorials/ablations'))).select_one('article')
    printed = abl.select('div.cell_output table')
    assert len(printed) >= 5 and any(t.select('strong') for t in printed), 'printed tables rendered, **bold** as bold'
    assert abl.select('div.cell_output pre'), 'the text printed around a table stays text'
    order = [e.name for e in abl.select('div.cell_output')[0].find_all(['pre', 'table'])]
    assert 'table' in order and order.index('pre') < order.index('table') and 'pre' in order[order.index('table'):], \
        'text and tables in the order printed (a title before its table, notes after)'

def test_builder_turns_printed_tables_into_tables():
    text = 'EP2, Dice %:\n| Method | liver |\n|---|---:|\n| adnet | **5.08** |\ntable saved\n'
    assert bd.table_blocks(text) == [(False, 'EP2, Dice %:\n'), (True, '| Method | liver |\n|---|---:|\n| adnet | **5.08** |\n'),
                                     (False, 'table saved\n')]
    outs = bd.tables_to_markdown([nbformat.v4.new_output('stream', name='stdout', text=text)])
    assert [list(o['data']) for o in outs] == [['text/plain'], ['text/markdown', 'text/plain'], ['text/plain']]
    assert outs[1]['data']['text/markdown'].startswith('| Method') and outs[2]['data']['text/plain'] == 'table saved'
    plain = nbformat.v4.new_output('stream', name='stdout', text='a | b\n')
    assert bd.tables_to_markdown([plain]) == [plain], 'a stream without a table is left as it is'
    assert bd.table_blocks('a | b\nno rule here\n') == [(False, 'a | b\nno rule here\n')]
    md = nbformat.v4.new_output('display_data', data={'text/markdown': '| a |\n|---|\n| 1 |\n', 'text/plain': ''})
    mixed = bd.tables_to_markdown([nbformat.v4.new_output('stream', name='stdout', text='title\n'), md,
                                   nbformat.v4.new_output('stream', name='stdout', text='\nnote\n')])
    assert [o['output_type'] for o in mixed] == ['display_data'] * 3 and mixed[2]['data']['text/plain'] == 'note', \
        'prints around a markdown display stay in place (MyST-NB would merge the streams above the table)'

def test_patched_methods_are_methods():
    src = '@patch\ndef segment(self:LabelWidget, query): pass\n@patch_to(Viewer)\ndef show(self): pass\ndef f(x): pass\nclass _P: pass'
    assert bd.public_defs(src) == ['LabelWidget.segment', 'Viewer.show', 'f']

def test_tables_scroll_sideways_on_phones(site, browser):
    "At 400 px a wide table scrolls inside its box (every column reachable), the page itself does not."
    page = _open(browser, site/_page(_nb_with(r'tutorials/ablations')), width=400, height=800)
    res = page.evaluate("""() => [...document.querySelectorAll('article table')].map(t => {
        let el = t, scroll = false;
        while (el && el.tagName !== 'ARTICLE') {
            const o = getComputedStyle(el).overflowX;
            if ((o === 'auto' || o === 'scroll') && el.clientWidth <= window.innerWidth) { scroll = true; break; }
            el = el.parentElement; }
        return {wide: t.scrollWidth > window.innerWidth - 20, scroll: scroll,
                reach: el ? el.scrollWidth >= t.scrollWidth - 1 : false}; })""")
    assert res and any(r['wide'] for r in res), 'the ablation tables are wider than a phone'
    cut = [i for i, r in enumerate(res) if r['wide'] and not (r['scroll'] and r['reach'])]
    assert not cut, f'tables {cut} are cut at 400px instead of scrolling'
    sw, w = page.evaluate('[document.documentElement.scrollWidth, window.innerWidth]')
    assert sw <= w, f'the page scrolls sideways ({sw}px)'
    page.close()


def _entries(site):
    "{id of an API entry: (page, <dt>)} over the whole site."
    res = {}
    for f in _html_files(site):
        if '_modules' in f.parts: continue
        for dt in _soup(f).select('article dl.py > dt[id]'): res.setdefault(dt['id'], (f.relative_to(site).as_posix(), dt))
    return res

def _has_signature(dt) -> bool: return dt.select_one('.sig-paren') is not None

def test_named_entries_have_their_signatures(site):
    e = _entries(site)
    for q, params in [('fsmis.label.LabelWidget', ['image', 'classes', 'affine', 'slice_index', 'zoom']),
                      ('fsmis.viz.VolumeViewer', ['case_or_volume', 'label', 'pred']),
                      ('fsmis.label.LabelWidget.segment', ['query', 'out', 'checkpoint', 'z', 'device'])]:
        assert q in e, f'{q} has no entry'
        page, dt = e[q]
        names = [n.get_text() for n in dt.select('em.sig-param span.n, em.sig-param .sig-name')]
        assert all(p in names for p in params) and '*args' not in dt.get_text(), f'{q} on {page}: {dt.get_text(" ", strip=True)}'
        assert '= None' not in dt.get_text().split('(')[0], f'{q} rendered as an attribute'
    seg = e['fsmis.label.LabelWidget.segment'][1].find_next_sibling('dd').get_text(' ', strip=True)
    assert 'bundled model' in seg and 'support slice' in seg, 'parameter comments of a @patch method shown'
    assert e['fsmis.label.LabelWidget.segment'][1].select_one('a[href*="_modules/"]') is not None, '[source] link'

def test_every_public_callable_has_a_signature(site):
    """Sweep: every function and class that a module defines and lists in __all__, and their public methods, have an
    entry with a signature (a `@patch` function is the method of its class)."""
    import importlib, inspect
    from fsmis._modidx import d
    entries, missing, nosig, n = _entries(site), [], [], 0
    def check(q, obj, alts=()):
        nonlocal n
        n += 1
        hit = entries.get(q) or next((entries[a] for a in alts if a in entries), None)
        if hit is None: missing.append(q); return
        page, dt = hit
        try: inspect.signature(obj)
        except ValueError: return   # none to show: an exception class keeping a builtin's __init__
        if not _has_signature(dt): nosig.append(f'{q} ({page})')
        elif inspect.isclass(obj) and '*args, **kwargs' in dt.get_text(' ', strip=True).replace(' ,', ','):
            try: real = str(inspect.signature(obj))
            except (TypeError, ValueError): real = ''
            if '**kwargs' not in real: nosig.append(f'{q} ({page}): (*args, **kwargs) instead of {real}')
    for modname in d['syms']:
        mod = importlib.import_module(modname)
        for name in getattr(mod, '__all__', []):
            obj = getattr(mod, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)) or getattr(obj, '__module__', None) != modname: continue
            if obj.__name__ != name: continue   # made by a call (`positive_int = whole_number(1)`), not a def or class
            check(f'{modname}.{name}', obj, [f'{modname}.{obj.__qualname__}'])   # a @patch function: Class.name
            if not inspect.isclass(obj): continue
            for m, v in vars(obj).items():
                f = getattr(v, '__func__', v)
                if m.startswith('_') or not inspect.isfunction(f): continue
                check(f'{modname}.{name}.{m}', f, [k for k in entries if k.endswith(f'.{name}.{m}')])
    assert n > 100, n
    assert not missing, f'{len(missing)} public callables without an API entry:\n' + '\n'.join(missing[:40])
    assert not nosig, f'{len(nosig)} entries without a signature:\n' + '\n'.join(nosig[:40])


def test_home_page_leads_to_the_tutorials(site):
    home = _soup(site/'index.html')
    hrefs = {urlsplit(a['href']).path for a in home.select('article a[href]')}
    for nb in ['tutorials/quick_start.ipynb', 'tutorials/your_own_scans.ipynb', 'tutorials/when_to_use.ipynb',
               'tutorials/ablations.ipynb', 'tutorials/densemp.ipynb', _nb_with(r'_label\.ipynb$'), _nb_with(r'_core\.ipynb$')]:
        assert _page(nb) in hrefs, f'the home page does not link {_page(nb)}'
        assert (site/_page(nb)).is_file()
    nxt = home.select_one('a.next-page')
    assert nxt is not None and urlsplit(nxt['href']).path == _page('tutorials/quick_start.ipynb'), '"Next" leads to the quick start'
    assert [sec for sec, _ in _listed() if sec][0] == 'Tutorials', 'tutorials first in the sidebar'
    assert home.select('.sidebar-tree p.caption')[0].get_text(strip=True) == 'Tutorials'

def test_home_page_links_work_in_the_browser(site, browser):
    page = _open(browser, site/'index.html')
    page.click('article a[href="tutorials/quick_start.html"]')
    page.wait_for_load_state('load')
    assert page.url.endswith('tutorials/quick_start.html') and 'Quick start' in page.inner_text('article h1'), page.url
    page.click('a.next-page')   # and on to the next tutorial
    page.wait_for_load_state('load')
    assert '/tutorials/' in page.url and not page.errors
    page.close()

def test_labelling_and_when_to_use_pages(site):
    lab = _soup(site/_page(_nb_with(r'_label\.ipynb$'))).select_one('article').get_text()
    assert 'pip install jupyterlab' in lab and 'pip install ".[dev]"' in lab, 'how to get JupyterLab for the widget'
    assert 'adnet_chaos_t2_small.pth' in lab and 'bundled' in lab, 'the model segment uses without a checkpoint'
    w = _soup(site/_page('tutorials/when_to_use.ipynb')).select_one('article')
    text = w.get_text(' ')
    for cite in ['arXiv:2408.00714', 'arXiv:2504.03600', 'arXiv:2503.08373', 'GPU', 'approximate']:
        assert cite in text, cite
    assert w.select('table'), 'the comparison is a table'

UNREADABLE = ('REFERENCE_FACTS', '../shared/')  # files of the development machine, not in the repository

def _unreadable_refs(name: str, text: str) -> list:
    return [f'{name}: ...{text[max(0, i - 60):i + 40]!r}...' for s in UNREADABLE for i in [m.start() for m in re.finditer(re.escape(s), text)]]

def test_no_citation_of_files_a_reader_cannot_open(site):
    "No page (prose, code, outputs, attributes) names REFERENCE_FACTS.md or a ../shared/ path: papers are cited by title."
    bad = [r for f in _html_files(site) for r in _unreadable_refs(str(f.relative_to(site)), f.read_text(encoding='utf-8'))]
    assert not bad, f'{len(bad)} citations of files a reader cannot open:\n' + '\n'.join(bad[:20])

def test_no_citation_of_files_a_reader_cannot_open_in_the_browser(site, browser):
    "The same, as Chromium renders every page: its text and its DOM after the scripts ran."
    bad = []
    for f in _html_files(site):
        page = _open(browser, f)
        name = str(f.relative_to(site))
        bad += _unreadable_refs(name, page.inner_text('body')) + _unreadable_refs(name + ' (DOM)', page.content())
        page.close()
    assert not bad, f'{len(bad)} citations of files a reader cannot open:\n' + '\n'.join(bad[:20])
