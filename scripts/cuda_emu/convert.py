import re, sys
src = open(sys.argv[1]).read()
out = []
i = 0
while True:
    j = src.find('<<<', i)
    if j < 0:
        out.append(src[i:]); break
    ls = src.rfind('\n', 0, j) + 1
    indent = len(src[ls:j]) - len(src[ls:j].lstrip())
    name = src[ls + indent:j]
    k = src.find('>>>', j)
    cfg = src[j + 3:k]
    # split cfg by top-level commas
    parts, depth, cur = [], 0, ''
    for ch in cfg:
        if ch in '(<': depth += 1
        if ch in ')>': depth -= 1
        if ch == ',' and depth == 0: parts.append(cur); cur = ''
        else: cur += ch
    parts.append(cur)
    assert src[k + 3] == '(', src[k:k+10]
    depth = 0; m = k + 3
    while True:
        if src[m] == '(': depth += 1
        elif src[m] == ')':
            depth -= 1
            if depth == 0: break
        m += 1
    args = src[k + 4:m]
    out.append(src[i:ls + indent])
    out.append(f'::emu::launch(dim3({parts[0]}), dim3({parts[1]}), [=]() {{ {name}({args}); }})')
    i = m + 1
open(sys.argv[2], 'w').write(''.join(out))
