"""Write train.json / dev.json: synthetic comments labelled spam ("1") or not ("0").

The seed's SpamClassify format ({"content": ..., "label": "0"|"1"}, one JSON object per line),
made from templates with a fixed seed, so the files are reproducible and carry no real data:

    python examples/spam_classify/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPAM = [
    "加微信{wx}领取{gift}，名额有限先到先得",
    "{gift}免费送！点击主页链接立即领取",
    "兼职刷单日赚{money}元，私信我拉你进群",
    "低价出售{item}，需要的加V：{wx}",
    "恭喜您获得{gift}一份，回复1即可领取",
    "专业代写代考，包过，联系QQ{qq}",
    "投资理财稳赚不赔，月收益{money}元起，详情加微信{wx}",
    "关注我的主页，每天分享赚钱秘诀，轻松月入{money}",
    "{item}清仓大甩卖一折起，戳链接抢购",
    "点赞这条评论抽{gift}，转发再送{money}元红包",
]
HAM = [
    "这个视频讲得很清楚，{topic}终于看懂了",
    "我觉得{topic}这部分还可以再详细一点",
    "请问{topic}有没有推荐的入门书？",
    "昨天照着教程做了{dish}，味道不错",
    "{place}的风景真的很美，下次还想去",
    "作者辛苦了，期待下一期关于{topic}的内容",
    "同意楼上的看法，{topic}确实不容易",
    "我家附近也开了一家卖{dish}的店，周末去试试",
    "这首歌让我想起了在{place}读书的日子",
    "第三分钟那里是不是说错了？{topic}应该反过来吧",
]
FILL = {
    "wx": ["abc8899", "vip_666", "xx12345", "money777", "hb2024"],
    "qq": ["123456789", "987654321", "555666777"],
    "gift": ["iPhone", "购物卡", "话费", "现金红包", "会员年卡"],
    "money": ["300", "500", "1000", "5000"],
    "item": ["名牌包", "手表", "化妆品", "运动鞋"],
    "topic": ["线性代数", "量子力学", "Python 装饰器", "宏观经济", "光合作用", "递归"],
    "dish": ["红烧肉", "番茄炒蛋", "酸菜鱼", "蛋挞"],
    "place": ["杭州", "大理", "青岛", "成都"],
}


OPENERS = ["", "", "哈哈，", "说真的，", "路过，", "第一次评论，", "顺便说一句，"]
ENDINGS = ["", "", "！", "。", "~", "，大家怎么看？", "，赞一个"]


def comment(rng: random.Random, templates: list[str]) -> str:
    t = rng.choice(templates)
    body = t.format(**{k: rng.choice(v) for k, v in FILL.items()})
    return rng.choice(OPENERS) + body + rng.choice(ENDINGS)


def main() -> None:
    rng = random.Random(20230601)
    here = Path(__file__).resolve().parent
    seen: set[str] = set()  # no comment appears twice, nor in both files
    for name, n in (("train.json", 240), ("dev.json", 40)):
        rows = []
        while len(rows) < n:
            label = "1" if rng.random() < 0.5 else "0"
            text = comment(rng, SPAM if label == "1" else HAM)
            if text not in seen:
                seen.add(text)
                rows.append({"content": text, "label": label})
        with open(here / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
