"The installed package: every module imports, and a non-editable build contains every module."
import importlib, pkgutil, subprocess, sys, zipfile
from pathlib import Path
import fsmis

ROOT = Path(__file__).resolve().parents[1]


def _modules():
    return sorted(m.name for m in pkgutil.walk_packages(fsmis.__path__, 'fsmis.'))


def test_every_module_imports():
    mods = _modules()
    assert 'fsmis.core' in mods
    for m in mods: importlib.import_module(m)


def test_wheel_has_every_module(tmp_path):
    "`pip install .` (non-editable) must ship every module: build the wheel and compare with the source tree."
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp_path), str(ROOT)],
                   check=True, cwd=tmp_path)
    whl, = tmp_path.glob('fsmis-*.whl')
    names = set(zipfile.ZipFile(whl).namelist())
    src = {str(p.relative_to(ROOT)) for p in (ROOT/'fsmis').rglob('*.py')}
    assert src <= names, f"missing from the wheel: {sorted(src - names)}"
    # and the installed copy imports every module from outside the source tree
    target = tmp_path/'site'
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(target), str(whl)], check=True)
    code = ("import importlib, pkgutil, fsmis; assert fsmis.__file__.startswith(%r), fsmis.__file__; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(fsmis.__path__, 'fsmis.')]") % str(target)
    subprocess.run([sys.executable, '-c', code], check=True, cwd=tmp_path, env={'PYTHONPATH': str(target), 'PATH': '/usr/bin:/bin'})
