//! Line rules: spam lines that crawled Chinese pages mix into articles. Each rule has a name
//! (used in counters, switches and the cleaned output) and judges one line on its own.
//!
//! Rules that match phrases an article might also use (a call to action, a share prompt) apply
//! only to short lines; article paragraphs are long.

use regex::Regex;

/// Names of the line rules, in the order they are tried.
pub const LINE_RULES: &[&str] = &["contact", "ad", "call_to_action", "share", "menu", "comment_prompt", "footer", "page_meta"];

/// Compiled line rules.
#[derive(Debug)]
pub struct LineRules {
    contact: Vec<Regex>,
    ad_words: Vec<&'static str>,
    cta: Regex,
    share: Regex,
    share_platforms: Vec<&'static str>,
    comment: Regex,
    footer: Regex,
    meta: Regex,
}

const AD_WORDS: &[&str] = &[
    "代充",
    "代购",
    "充值",
    "包邮",
    "秒杀",
    "限时",
    "特价",
    "低价",
    "下单",
    "发货",
    "账号",
    "会员",
    "加盟",
    "招商",
    "返利",
    "免费领取",
    "抢购",
    "现货",
    "批发",
    "团购",
    "爆款",
    "旗舰店",
    "正品",
    "优惠",
    "折扣",
    "促销",
    "售后",
    "客服",
    "代理",
    "广告",
    "推广",
    "独家",
    "官方授权",
    "升级",
    // The same in Traditional characters, so spam is caught before (or without) conversion.
    "代購",
    "包郵",
    "秒殺",
    "限時",
    "特價",
    "低價",
    "下單",
    "發貨",
    "帳號",
    "賬號",
    "會員",
    "加盟",
    "返利",
    "免費領取",
    "搶購",
    "現貨",
    "批發",
    "團購",
    "旗艦店",
    "優惠",
    "促銷",
    "售後",
    "代理",
    "廣告",
    "推廣",
    "獨家",
    "升級",
];

const NAV_WORDS: &[&str] = &["首页", "上一篇", "下一篇", "返回顶部", "网站地图", "登录", "注册", "返回首页", "联系我们", "关于我们", "更多", "导航"];

impl LineRules {
    pub fn new() -> Self {
        // The patterns are constants; `Regex::new` cannot fail on them (checked by the tests).
        let re = |p: &str| Regex::new(p).expect("line-rule pattern is valid");
        LineRules {
            contact: vec![
                // WeChat ids in the forms spammers use.
                re(r"(?i)(微信|威信|薇信|v信|vx|wx|weixin|wechat|加v|加微|line\s*id)\s*号?\s*[:：]?\s*[A-Za-z][-_A-Za-z0-9]{4,}"),
                re(r"(?i)加(我|个)?(微信|v信|vx|薇|威信)"),
                re(r"(?i)qq\s*(群|号)?\s*[:：]?\s*\d{5,11}"),
                // Mobile, 400 and landline numbers.
                re(r"(?:^|\D)1[3-9]\d(?:[-\s]?\d{4}){2}(?:\D|$)"),
                re(r"(?:^|\D)400[-\s]?\d{3}[-\s]?\d{4}(?:\D|$)"),
                re(r"(?:^|\D)0\d{2,3}-\d{7,8}(?:\D|$)"),
                re(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
                re(r"(?i)https?://|www\.[a-z0-9-]+\."),
                re(r"(?i)(?:^|[^a-z0-9.-])[a-z0-9-]+\.(?:com|cn|net|org|top|xyz|cc|io|vip|shop)(?:[^a-z0-9]|$)"),
            ],
            ad_words: {
                // Simplified and Traditional spellings coincide for some words: count each once.
                let mut w = AD_WORDS.to_vec();
                w.sort_unstable();
                w.dedup();
                w
            },
            cta: re(
                r"(?i)(点击|点此|戳)(这里|此处|链接|下方|查看|进入|下载|购买|领取|咨询|了解)|立即(购买|下载|注册|咨询|抢购|领取|订购|加入|体验|开通)|扫码|扫一扫|长按(识别|二维码)|关注(我们|公众号|微信|本站)|欢迎(咨询|订阅|来电|关注)|阅读原文|下载(app|客户端)|了解更多|马上(购买|抢|领取)|>>|》》",
            ),
            share: re(r"分享到|分享至|一键分享|分享给(好友|朋友)|收藏本(文|站|页)|点赞|转发到"),
            share_platforms: vec!["微信", "微博", "QQ空间", "朋友圈", "豆瓣", "知乎", "QQ"],
            comment: re(r"发表评论|发布评论|我要评论|写评论|网友评论|暂无评论|评论\s*[(（]?\d+|登录后(才能)?(发表)?评论|查看(全部|更多)评论|说点什么|我来说两句|留言板"),
            footer: re(r"(?i)©|copyright|版权所有|版權所有|保留所有权利|all rights reserved|icp备|icp证|公网安备|备案号|免责声明|转载请注明"),
            meta: re(r"^(发布时间|发表时间|更新时间|时间|日期|来源|作者|编辑|责任编辑|阅读|浏览|点击|發布時間|來源|作者|編輯|閱讀|點擊)\s*[:：]"),
        }
    }

    /// The first rule that removes `line`, if any; `enabled` says which rules are switched on.
    pub fn classify(&self, line: &str, enabled: impl Fn(&str) -> bool) -> Option<&'static str> {
        let n = line.chars().count();
        let short = |max: usize| n <= max;
        if enabled("contact") && self.contact.iter().any(|r| r.is_match(line)) {
            return Some("contact");
        }
        if enabled("ad") {
            // One sales word alone also occurs in ordinary and classical text (独家村, 优惠化):
            // it takes a second one, or a commercial marker (a price, digits, Latin letters).
            let hits = self.ad_words.iter().filter(|w| line.contains(*w)).count();
            let commercial = line.chars().any(|c| c.is_ascii_alphanumeric() || matches!(c, '¥' | '￥' | '$' | '%' | '元'));
            if hits >= 2 || (hits == 1 && short(30) && commercial) {
                return Some("ad");
            }
        }
        // A trailing '>' is a button ("立即购买>"), unless it closes an inline <tag>.
        let arrow = line.trim_end().ends_with(['>', '→']) && !line.contains('<');
        if enabled("call_to_action") && short(50) && (self.cta.is_match(line) || arrow) {
            return Some("call_to_action");
        }
        if enabled("share") && short(40) {
            let platforms = self.share_platforms.iter().filter(|p| line.contains(*p)).count();
            if self.share.is_match(line) || platforms >= 2 {
                return Some("share");
            }
        }
        if enabled("menu") && is_menu(line) {
            return Some("menu");
        }
        if enabled("comment_prompt") && short(30) && self.comment.is_match(line) {
            return Some("comment_prompt");
        }
        if enabled("footer") && short(80) && self.footer.is_match(line) {
            return Some("footer");
        }
        if enabled("page_meta") && short(60) && self.meta.is_match(line) {
            return Some("page_meta");
        }
        None
    }
}

impl Default for LineRules {
    fn default() -> Self {
        Self::new()
    }
}

/// A navigation line: one navigation word on its own, or three or more short items separated
/// by `|`, `｜`, `/`, `·`, `>`, `»` or spaces with no sentence punctuation.
fn is_menu(line: &str) -> bool {
    let t = line.trim();
    if NAV_WORDS.contains(&t) {
        return true;
    }
    // "上一篇：… 下一篇：…" links between articles.
    if (t.starts_with("上一篇") || t.starts_with("下一篇") || t.starts_with("上一頁") || t.starts_with("下一頁")) && t.chars().count() <= 80 {
        return true;
    }
    if t.contains(['，', '。', '！', '？', ',', '.']) {
        return false;
    }
    let items: Vec<&str> = t.split(['|', '｜', '/', '·', '•', '>', '»', ' ', '　']).map(str::trim).filter(|s| !s.is_empty()).collect();
    // Short items alone could be a list of tune names (烛影摇红/望江南): a menu also has a
    // navigation word or the separators menus use.
    let menu_marks = items.iter().any(|s| NAV_WORDS.contains(s)) || t.contains(['|', '｜', '»', '>']);
    items.len() >= 3 && items.iter().all(|s| s.chars().count() <= 6) && menu_marks
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(line: &str) -> Option<&'static str> {
        LineRules::new().classify(line, |_| true)
    }

    #[test]
    fn each_rule_has_a_positive_and_a_negative_case() {
        // (line, expected rule)
        let positive = [
            ("加我微信:abc12345 领资料", "contact"),
            ("有问题联系QQ：123456789", "contact"),
            ("客服热线 138-1234-5678", "contact"),
            ("投稿邮箱 editor@example.com", "contact"),
            ("更多内容见 https://example.cn/a", "contact"),
            ("GPT-4 Plus 代充升级", "ad"),
            ("下单后立即获得账号，24小时发货", "ad"),
            ("立即购买>", "call_to_action"),
            ("扫码关注公众号，了解更多", "call_to_action"),
            ("首页 | 关于我们 | 联系我们", "menu"),
            ("上一篇", "menu"),
            ("分享到：微信 微博 QQ空间", "share"),
            ("发表评论", "comment_prompt"),
            ("网友评论（12）", "comment_prompt"),
            ("Copyright © 2024 某某网 版权所有", "footer"),
            ("京ICP备12345678号", "footer"),
            ("发布时间：2023-04-12 09:30 来源：某某网 阅读：2,381次", "page_meta"),
            ("上一篇：一文读懂词牌与曲牌下一篇：王维山水诗里的“静”", "menu"),
            ("GPT-4 Plus 代充升級，下單後立即獲得帳號，24小時發貨", "ad"),
        ];
        for (line, want) in positive {
            assert_eq!(rule(line), Some(want), "{line}");
        }
        // Article lines that mention the same words in passing must survive.
        let negative = [
            "王维在诗中写道：独在异乡为异客，每逢佳节倍思亲。这首诗作于他十七岁时。",
            "唐代的茶叶贸易十分兴盛，陆羽在《茶经》中详细记述了采茶、制茶和饮茶的方法，被后人尊为茶圣。",
            "公元前221年，秦统一六国，书同文，车同轨。",
            "他把这封信分享给了家人，大家读后都很感动，觉得这是一段值得记住的往事。",
            "在评论这首诗时，历代学者多称赞其意境深远，语言质朴而情感真挚，堪称绝唱。",
            "李白 杜甫 王维 是唐代最著名的三位诗人，他们的作品流传至今。",
            "静夜思",
            "1234年，蒙古灭金。",
            "作者在这篇文章里回忆了童年时在外婆家度过的夏天，那时每天傍晚都要去河边打水。",
            // Classical lines from the chinese-poetry corpus that once tripped the rules.
            "藉藉声名自妙年，优优惠化咏来宣。",
            "三间茅屋独家村，风雨萧萧可断魂。",
            "直下单提，佛祖不犯令。",
            "烛影摇红/望江南/烛影摇红",
            "困时节布衲里睡<鼻勾>",
        ];
        for line in negative {
            assert_eq!(rule(line), None, "{line}");
        }
    }

    #[test]
    fn switched_off_rules_do_not_fire() {
        let r = LineRules::new();
        assert_eq!(r.classify("发表评论", |name| name != "comment_prompt"), None);
    }
}
