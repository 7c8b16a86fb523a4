"""Full ros2msg definitions (with dependencies) for MCAP schemas, read from the ament index."""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from cdcca_ros.errors import ConfigError

_PRIMITIVES = {'bool', 'byte', 'char', 'float32', 'float64', 'int8', 'uint8', 'int16', 'uint16',
               'int32', 'uint32', 'int64', 'uint64', 'string', 'wstring'}
_SEPARATOR = '=' * 80


def _msg_file(type_name: str) -> Path:
    pkg, _, name = type_name.partition('/msg/')
    if not name:
        raise ConfigError(f'{type_name!r} is not a "pkg/msg/Type" name')
    from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

    try:
        share = Path(get_package_share_directory(pkg))
    except PackageNotFoundError as err:
        raise ConfigError(f'package {pkg!r} of {type_name} is not in the ament index') from err
    path = share / 'msg' / f'{name}.msg'
    if not path.is_file():
        raise ConfigError(f'{path} does not exist')
    return path


def _dependencies(pkg: str, text: str) -> list[str]:
    deps = []
    for line in text.splitlines():
        line = line.split('#', 1)[0].strip()
        if not line or '=' in line.split()[1 if len(line.split()) > 1 else 0]:
            continue
        field_type = re.sub(r'\[.*?\]', '', line.split()[0])
        field_type = re.sub(r'<=\d+$', '', field_type)
        if field_type in _PRIMITIVES or field_type.startswith('string<='):
            continue
        if '/' in field_type:
            dep_pkg, dep_name = field_type.split('/')[0], field_type.split('/')[-1]
        else:
            dep_pkg, dep_name = pkg, field_type
        deps.append(f'{dep_pkg}/msg/{dep_name}')
    return deps


@cache
def definition(type_name: str) -> str:
    """The ros2msg text of ``type_name`` followed by every type it uses (MCAP's format)."""
    main = _msg_file(type_name).read_text()
    seen: list[str] = []
    todo = _dependencies(type_name.split('/')[0], main)
    parts = [main.rstrip('\n')]
    while todo:
        dep = todo.pop(0)
        if dep in seen:
            continue
        seen.append(dep)
        text = _msg_file(dep).read_text()
        short = dep.replace('/msg/', '/')
        parts.append(f'{_SEPARATOR}\nMSG: {short}\n{text.rstrip(chr(10))}')
        todo.extend(_dependencies(dep.split('/')[0], text))
    return '\n'.join(parts) + '\n'
