"""Sphinx configuration of the offline docs site (built by tools/build_docs.py from the notebooks it stages).

Furo theme (search box, collapsible menu on narrow screens), MyST-NB (notebooks rendered from their stored outputs,
never executed), autodoc + viewcode (API entries with [source] links), MathJax 3 from the sphinx-mathjax-offline
package (no CDN). Title, description and repository come from nbdev's settings (pyproject.toml [tool.nbdev],
nbs/nbdev.yml), so nbdev-docs and this site say the same.
"""
import inspect, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nbdev.config import get_config
_cfg = get_config(path=ROOT)
try:
    import yaml
    _web = (yaml.safe_load((ROOT/'nbs'/'nbdev.yml').read_text()) or {}).get('website') or {}
except Exception: _web = {}
project = _web.get('title') or _cfg.lib_name
repo_url = _web.get('repo-url') or _cfg.git_url
html_title = project
author = _cfg.get('author', '') or f'{project} developers'
copyright = author

extensions = ['myst_nb', 'sphinx.ext.autodoc', 'sphinx.ext.viewcode', 'sphinx.ext.mathjax']
root_doc = 'index'
exclude_patterns = ['_site.json', '**/.ipynb_checkpoints']
templates_path = [str(ROOT/'docs'/'_templates')]

# notebooks: stored outputs only; no widget JavaScript from a CDN (widgets show their stored image instead)
nb_execution_mode = 'off'
nb_ipywidgets_js = {}
nb_mime_priority_overrides = [('html', 'application/vnd.jupyter.widget-view+json', None),
                              ('html', 'application/vnd.jupyter.widget-state+json', None)]
nb_merge_streams = True
# text/markdown outputs (and the printed tables tools/build_docs.py turns into them) are parsed as MyST, whose tables
# the default ('commonmark') lacks: a results table would otherwise be one paragraph of pipes
nb_render_markdown_format = 'myst'
myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence', 'attrs_block', 'attrs_inline']
myst_heading_anchors = 3
suppress_warnings = ['mystnb.unknown_mime_type']

# API reference: signatures as written, parameter comments (docments) as parameter docs, [source] links
autodoc_member_order = 'bysource'
autodoc_preserve_defaults = True
autodoc_typehints = 'signature'
autoclass_content = 'class'
add_module_names = False
maximum_signature_line_length = 60

# A widget class (ipywidgets -> traitlets.HasDescriptors) inherits a pass-through `__new__(cls, *args, **kwargs)`,
# which autodoc reads before `__init__`: `LabelWidget(*args, **kwargs)`. Treat it as Sphinx treats typing.Generic's.
def _skip_passthrough_new():
    from importlib import import_module
    for mod in ('sphinx.ext.autodoc._dynamic._signatures', 'sphinx.ext.autodoc._legacy_class_based._documenters',
                'sphinx.ext.autodoc'):
        try: m = import_module(mod)
        except ImportError: continue
        if isinstance(getattr(m, '_CLASS_NEW_BLACKLIST', None), (frozenset, set, list)):
            m._CLASS_NEW_BLACKLIST = frozenset({*m._CLASS_NEW_BLACKLIST, 'traitlets.traitlets.HasDescriptors.__new__'})
_skip_passthrough_new()

# autodoc_preserve_defaults reads the defaults from the source, one per parameter with a default; a signature that
# fastcore's @delegates widened (the delegated keywords are not in the source) makes it pop from an empty list and
# fail the build. Such a function keeps the signature @delegates gives it (the delegated defaults as values).
def _tolerant_preserve_defaults():
    try: from sphinx.ext.autodoc._dynamic import _signatures
    except ImportError: return
    orig = _signatures.update_default_value
    def update_default_value(obj, bound_method):
        try: orig(obj, bound_method=bound_method)
        except IndexError: pass
    _signatures.update_default_value = update_default_value
_tolerant_preserve_defaults()
python_maximum_signature_line_length = 60


html_theme = 'furo'
html_favicon = str(ROOT/'nbs'/'images'/'favicon.svg')
html_static_path = [str(ROOT/'docs'/'_static')]
html_css_files = ['site.css']
html_copy_source = False
html_show_sourcelink = False
html_domain_indices = False   # no module index page (the sidebar is the index)
html_show_search_summary = False   # summaries fetch() each result page, which file:// pages may not do
html_context = {'repo_url': repo_url}
html_sidebars = {'**': ['sidebar/brand.html', 'sidebar/search.html', 'sidebar/scroll-start.html',
                        'sidebar/navigation.html', 'sidebar/repository.html', 'sidebar/scroll-end.html']}
html_theme_options = {
    'footer_icons': [{'name': 'GitHub', 'url': repo_url, 'class': '', 'html': (
        '<svg stroke="currentColor" fill="currentColor" stroke-width="0" viewBox="0 0 16 16" aria-hidden="true"><path fill-rule="evenodd" '
        'd="M8 0C3.58 0 0 3.58 0 8c0 3.54 2.29 6.53 5.47 7.59.4.07.55-.17.55-.38 0-.19-.01-.82-.01-1.49-2.01.37-2.53-.49-2.69-.94-.09-.23-.48-.94'
        '-.82-1.13-.28-.15-.68-.52-.01-.53.63-.01 1.08.58 1.23.82.72 1.21 1.87.87 2.33.66.07-.52.28-.87.51-1.07-1.78-.2-3.64-.89-3.64-3.95 0-.87.31'
        '-1.59.82-2.15-.08-.2-.36-1.02.08-2.12 0 0 .67-.21 2.2.82.64-.18 1.32-.27 2-.27.68 0 1.36.09 2 .27 1.53-1.04 2.2-.82 2.2-.82.44 1.1.16 1.92'
        '.08 2.12.51.56.82 1.27.82 2.15 0 3.07-1.87 3.75-3.65 3.95.29.25.54.73.54 1.48 0 1.07-.01 1.93-.01 2.2 0 .21.15.46.55.38A8.013 8.013 0 0 0 16 '
        '8c0-4.42-3.58-8-8-8z"></path></svg><span class="visually-hidden">Repository on GitHub</span>')}],
}

# ---- nbdev docstrings -> reStructuredText ---------------------------------------------------------------------------
# nbdev docstrings are markdown-ish one-liners (`code`, a*b) and parameters are documented by comments after them
# (docments): escape what reST would read as markup, link `symbols` of the package, add the comments as :param: fields.

def _symbols():
    try: from fsmis._modidx import d
    except ImportError: return {}
    res, short = {}, {}
    for mod, syms in d.get('syms', {}).items():
        res[mod] = mod
        for q in syms: res[q] = q; short.setdefault(q.removeprefix(mod + '.'), []).append(q)
    res.update({k: v[0] for k, v in short.items() if len(v) == 1 and k not in res})
    return res

_SYMS = _symbols()

def md2rst(text: str) -> str:
    "One docstring line, nbdev markdown -> reST: `code` -> literal or cross-reference, markup characters escaped."
    parts = re.split(r'(`[^`]+`)', text)
    out = []
    for i, part in enumerate(parts):
        if not i % 2: out.append(re.sub(r'([\\*_|`])', r'\\\1', part)); continue
        code = part[1:-1]
        q = _SYMS.get(code.removesuffix('()'))
        lit = f':py:obj:`{code} <{q}>`' if q else f'``{code}``' if code.strip() == code else part
        # reST needs a space or punctuation around inline markup: `Callback`s -> ``Callback``\ s (shown as "Callbacks")
        if parts[i-1][-1:].isalnum(): lit = '\\ ' + lit
        if i + 1 < len(parts) and re.match(r'[\w(\[]', parts[i+1][:1]): lit += '\\ '
        out.append(lit)
    return ''.join(out)

def _star_comments(obj) -> dict:
    "Comments after `*args` / `**kw` in the signature's source (fastcore's docments gives a `**kw` comment to the return)."
    try: src = inspect.getsource(obj.__init__ if inspect.isclass(obj) else obj)
    except (TypeError, OSError): return {}
    head = src[:src.find(':\n', src.find(')'))] if ')' in src else src
    return {m.group(2): m.group(3).strip() for m in re.finditer(r'(\*\*?)(\w+)\s*,?\s*#\s*(.*)$', head, re.M)}

def _fields(obj):
    from fastcore.docments import docments
    try: ds = docments(obj, full=True, returns=True)
    except Exception: return []
    stars = _star_comments(obj)
    res = []
    for name, d in ds.items():
        doc = d.get('docment')
        kind = d.get('kind')
        if name in stars and kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD): doc = doc or stars[name]
        if not doc or name == 'self': continue
        if name == 'return':
            if doc not in stars.values(): res.append(f':returns: {md2rst(doc)}')
            continue
        star = {inspect.Parameter.VAR_POSITIONAL: r'\*', inspect.Parameter.VAR_KEYWORD: r'\*\*'}.get(kind, '')
        res.append(f':param {star}{name}: {md2rst(doc)}')
    return res

def process_docstring(app, what, name, obj, options, lines):
    if what not in ('function', 'class', 'method', 'exception'): lines[:] = [md2rst(l) for l in lines]; return
    body = [md2rst(l) for l in lines]
    fields = _fields(obj)
    if fields: body += [''] + fields
    lines[:] = body

# MathJax 3 from the sphinx-mathjax-offline package, trimmed to what the pages load: tex-svg.js is self-contained (no
# web fonts to fetch, so it also works from file://) and loads the TeX extensions it autoloads from input/tex/extensions.
mathjax_path = 'mathjax/tex-svg.js'

def copy_mathjax(app, exc):
    import importlib.util, shutil
    if exc is not None or app.builder.format != 'html': return
    src = Path(importlib.util.find_spec('sphinx-mathjax-offline').origin).parent/'static'/'mathjax'
    dst = Path(app.outdir)/'_static'/'mathjax'
    (dst/'input'/'tex').mkdir(parents=True, exist_ok=True)
    shutil.copy2(src/'tex-svg.js', dst/'tex-svg.js')
    shutil.copytree(src/'input'/'tex'/'extensions', dst/'input'/'tex'/'extensions', dirs_exist_ok=True)

# viewcode finds a method's source by its tag `Class.name` in the module; a method added with fastcore's `@patch` is a
# top-level `def name` there, so its [source] link goes to that def.
def find_source(app, modname):
    import importlib
    if not (modname == 'fsmis' or modname.startswith('fsmis.')): return None
    from sphinx.pycode import ModuleAnalyzer
    try:
        analyzer = ModuleAnalyzer.for_module(modname); analyzer.find_tags()
        mod = importlib.import_module(modname)
    except Exception: return None
    tags = dict(analyzer.tags)
    for cname, cls in vars(mod).items():
        if not inspect.isclass(cls) or cls.__module__ != modname: continue
        for name, f in vars(cls).items():
            t = tags.get(name)
            if (f'{cname}.{name}' not in tags and t and t[0] == 'def' and inspect.isfunction(f)
                    and f.__code__.co_filename == getattr(mod, '__file__', None) and t[1] <= f.__code__.co_firstlineno <= t[2]):
                tags[f'{cname}.{name}'] = t
    return analyzer.code, tags

def setup(app):
    app.connect('autodoc-process-docstring', process_docstring)
    app.connect('viewcode-find-source', find_source)
    app.connect('build-finished', copy_mathjax)
