//! Colours as written in parameters: `#rgb`, `#rrggbb`, `#rrggbbaa` (the `#` optional) and a few
//! names. Kept tiny on purpose; there is no need for CSS colour syntax in image parameters.

use serde::Serialize;

/// An sRGB colour with straight (not premultiplied) alpha.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Color(pub [u8; 4]);

impl Color {
    pub const WHITE: Color = Color([255, 255, 255, 255]);
    pub const BLACK: Color = Color([0, 0, 0, 255]);
    pub const TRANSPARENT: Color = Color([0, 0, 0, 0]);

    pub fn parse(s: &str) -> Result<Color, String> {
        match s {
            "white" => return Ok(Color::WHITE),
            "black" => return Ok(Color::BLACK),
            "transparent" | "none" => return Ok(Color::TRANSPARENT),
            "red" => return Ok(Color([255, 0, 0, 255])),
            "green" => return Ok(Color([0, 128, 0, 255])),
            "blue" => return Ok(Color([0, 0, 255, 255])),
            "gray" | "grey" => return Ok(Color([128, 128, 128, 255])),
            _ => {}
        }
        let hex = s.strip_prefix('#').unwrap_or(s);
        let bad = || {
            format!("`{}` is not a colour (#rgb, #rrggbb, #rrggbbaa or a name)", s.chars().take(20).collect::<String>())
        };
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let nib = |i: usize| u8::from_str_radix(&hex[i..i + 1], 16).map_err(|_| bad());
        let byte = |i: usize| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad());
        match hex.len() {
            3 => Ok(Color([nib(0)? * 17, nib(1)? * 17, nib(2)? * 17, 255])),
            6 => Ok(Color([byte(0)?, byte(2)?, byte(4)?, 255])),
            8 => Ok(Color([byte(0)?, byte(2)?, byte(4)?, byte(6)?])),
            _ => Err(bad()),
        }
    }

    pub fn hex(self) -> String {
        let [r, g, b, a] = self.0;
        if a == 255 { format!("#{r:02x}{g:02x}{b:02x}") } else { format!("#{r:02x}{g:02x}{b:02x}{a:02x}") }
    }

    /// The same colour with alpha replaced.
    pub fn with_alpha(self, a: u8) -> Color {
        let [r, g, b, _] = self.0;
        Color([r, g, b, a])
    }

    pub fn is_opaque(self) -> bool {
        self.0[3] == 255
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(Color::parse("#fff"), Ok(Color::WHITE));
        assert_eq!(Color::parse("ff0000"), Ok(Color([255, 0, 0, 255])));
        assert_eq!(Color::parse("#00ff0080"), Ok(Color([0, 255, 0, 128])));
        assert_eq!(Color::parse("transparent"), Ok(Color::TRANSPARENT));
        assert!(Color::parse("#ff00").is_err());
        assert!(Color::parse("#gggggg").is_err());
        assert!(Color::parse("é").is_err());
        assert_eq!(Color([1, 2, 3, 255]).hex(), "#010203");
    }
}
