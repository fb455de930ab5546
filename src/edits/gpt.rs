//! The gpt-image profile's phases after the body is read: field rules (multipart or JSON) →
//! resolve end user → user limits → reserve quota (§7 upper bound) → check files → canonical
//! body → forward (JSON answer or event stream). Entered from [`super::Edits::admit`] once the
//! request's model names this profile.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use jiff::civil::Date;

use super::check_files::{Files, ImageFile};
use crate::edit::gpt::{self, FamilyRules, GptEdit, GptLimits, ImageInput, Models};
use crate::error::GatewayError;
use crate::models::ModelsConfig;
use crate::pricing::{Quality, ReservationParams, TokenPrices, TokenPricesUsd};

/// The accepted gpt-image models with their rules and prices, built once at start.
pub struct ModelTable {
    entries: HashMap<String, ModelRules>,
    default: Option<String>,
    /// Ids of the dall-e-2 profile (`validation.models`).
    dall_e_2: Vec<String>,
    pub limits: GptLimits,
    /// Longest line of an upstream event stream.
    pub max_event_bytes: usize,
}

struct ModelRules {
    family: FamilyRules,
    prices: TokenPrices,
    shutdown: Option<Date>,
}

impl ModelTable {
    pub fn new(
        config: &ModelsConfig,
        dall_e_2: &[String],
    ) -> Result<ModelTable, crate::startup::StartupError> {
        use crate::startup::StartupError;
        let mut entries = HashMap::new();
        for (id, e) in &config.accepted {
            let mut family = match e.family.as_str() {
                "gpt-image-2" => FamilyRules::gpt_image_2(),
                "gpt-image-2.5" => FamilyRules::gpt_image_2_5(),
                "gpt-image-2.6" => FamilyRules::gpt_image_2_6(),
                other => {
                    return Err(StartupError::Models(format!(
                        "models.accepted.\"{id}\": unknown family '{other}'"
                    )));
                }
            };
            if let Some(o) = config.families.get(&e.family) {
                if let Some(q) = &o.quality {
                    family.quality = q.clone();
                }
                family.input_fidelity = o.input_fidelity.unwrap_or(family.input_fidelity);
                family.gif = o.gif.unwrap_or(family.gif);
                family.svg = o.svg.unwrap_or(family.svg);
                let s = &mut family.size;
                s.multiple = o.size_multiple.unwrap_or(s.multiple);
                s.max_edge = o.max_edge.unwrap_or(s.max_edge);
                s.min_pixels = o.min_pixels.unwrap_or(s.min_pixels);
                s.max_pixels = o.max_pixels.unwrap_or(s.max_pixels);
                s.max_ratio = o.max_aspect_ratio.unwrap_or(s.max_ratio);
            }
            let p = e.prices();
            let prices = TokenPrices::try_from(TokenPricesUsd {
                text_in: p.text_in,
                cached_text_in: p.cached_text_in,
                image_in: p.image_in,
                cached_image_in: p.cached_image_in,
                image_out: p.image_out,
            })
            .map_err(|e| StartupError::Models(format!("models.accepted.\"{id}\".prices: {e}")))?;
            entries.insert(
                id.clone(),
                ModelRules {
                    family,
                    prices,
                    shutdown: e.shutdown,
                },
            );
        }
        let l = &config.limits;
        Ok(ModelTable {
            entries,
            default: Some(config.default.clone()).filter(|d| !d.is_empty()),
            dall_e_2: dall_e_2.to_vec(),
            limits: GptLimits {
                max_prompt_chars: l.max_prompt_chars,
                max_user_chars: l.max_user_chars,
                max_images: l.max_images,
                max_image_bytes: l.max_image_bytes,
                max_mask_bytes: l.max_mask_bytes,
                max_text_bytes: 1 << 20,
            },
            max_event_bytes: l.max_event_bytes,
        })
    }

    /// Whether any gpt-image model is accepted (otherwise the gateway is dall-e-2-only).
    pub fn serves_gpt_image(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Whether `model` (or, absent, the default) is served by the dall-e-2 profile.
    pub fn is_dall_e_2(&self, model: Option<&str>) -> bool {
        match model.or(self.default.as_deref()) {
            Some(m) => self.dall_e_2.iter().any(|d| d == m),
            None => false,
        }
    }

    /// The table as of `today` (an id is retired from 00:00 UTC on its shutdown date).
    pub fn on(&self, today: Date) -> Today<'_> {
        Today { table: self, today }
    }

    pub fn prices(&self, model: &str) -> Option<TokenPrices> {
        self.entries.get(model).map(|e| e.prices)
    }
}

/// The model table on one day: what the field rules consult.
pub struct Today<'a> {
    table: &'a ModelTable,
    today: Date,
}

impl Models for Today<'_> {
    fn family(&self, model: &str) -> Option<&FamilyRules> {
        self.table
            .entries
            .get(model)
            .filter(|e| e.shutdown.is_none_or(|d| self.today < d))
            .map(|e| &e.family)
    }

    fn default_model(&self) -> Option<&str> {
        self.table.default.as_deref()
    }
}

/// The reservation's parameters (§7) of a checked request.
pub fn reservation_params(edit: &GptEdit) -> ReservationParams {
    let gif = edit.output_format_str() == Some("gif");
    ReservationParams {
        n: u32::from(edit.n_or_default()),
        size: match edit.size {
            Some(gpt::GptSize::Dims(w, h)) => Some((w, h)),
            _ => None,
        },
        quality: edit
            .quality
            .as_deref()
            .and_then(Quality::parse)
            .unwrap_or(Quality::Auto),
        gif_frames: gif.then(|| u32::from(edit.frame_count.unwrap_or(9))),
        stream: edit.is_stream(),
        partial_images: u32::from(edit.partial_images.unwrap_or(0)),
        input_files: edit.reference_count() as u32,
        prompt_bytes: edit.prompt.len() as u64,
    }
}

/// The files to check, by the params their errors name.
pub fn files_of(edit: &GptEdit) -> Files {
    let count = edit.images.len();
    let json = edit.encoding == gpt::Encoding::Json;
    let images = edit
        .images
        .iter()
        .enumerate()
        .map(|(i, input)| ImageFile {
            bytes: input.bytes().cloned(),
            format: input.format(),
            param: if json {
                format!("images[{i}]")
            } else if count == 1 {
                "image".into()
            } else {
                format!("image[{i}]")
            },
        })
        .collect();
    Files {
        images,
        mask: edit.mask.as_ref().and_then(|m| m.bytes().cloned()),
        markup: edit.markup.as_ref().and_then(|m| m.bytes().cloned()),
    }
}

/// Put a converted mask back into the request (uploads only: a `data:` URL is forwarded as
/// sent, and its conversion would change what the caller sent).
pub fn replace_mask(edit: &mut GptEdit, converted: Option<Bytes>) {
    if let (Some(ImageInput::Upload { bytes, .. }), Some(c)) = (edit.mask.as_mut(), converted) {
        *bytes = c;
    }
}

/// The canonical body of a checked request.
pub fn canonical(edit: &GptEdit) -> crate::edit::canonical::CanonicalBody {
    match edit.encoding {
        gpt::Encoding::Multipart => gpt::canonical::multipart(edit),
        gpt::Encoding::Json => {
            crate::edit::canonical::CanonicalBody::json(gpt::canonical::json(edit))
        }
    }
}

/// P2: the content types the route takes when it serves gpt-image models.
pub enum Body {
    Multipart(String),
    Json,
}

/// Tell the body's kind from its content type (P2, G41).
pub fn body_kind(content_type: Option<&http::HeaderValue>) -> Result<Body, GatewayError> {
    let shown = content_type
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if let Some(m) = content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<mime::Mime>().ok())
        && m.type_() == mime::APPLICATION
        && m.subtype() == mime::JSON
    {
        return Ok(Body::Json);
    }
    match crate::edit::form::boundary(content_type) {
        Ok(b) => Ok(Body::Multipart(b)),
        Err(_) => Err(GatewayError::invalid_request(
            None,
            Some("unsupported_content_type"),
            format!(
                "Unsupported content type: '{shown}'. This API method only accepts 'multipart/form-data' or 'application/json' requests, but you specified the header 'Content-Type: {shown}'. Please try again with a supported content type."
            ),
        )),
    }
}

/// Shared ownership for the service.
pub type Table = Arc<ModelTable>;
