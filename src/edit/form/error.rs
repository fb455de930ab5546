//! The form's refusals ([`FormError`]) worded as OpenAI words them: param, code and message
//! (and, through [`GatewayError`], status and type). The form code says what is wrong; the words
//! are decided here, once.

use super::{FormError, MAX_TEXT_PART_BYTES, MultipartFault};
use crate::error::{GatewayError, quoted_list, too_long};

impl From<FormError> for GatewayError {
    fn from(e: FormError) -> Self {
        use FormError::*;
        let field =
            |param: String, code, message: String| GatewayError::field(param, code, message);
        match e {
            ContentType { sent } => GatewayError::UnsupportedContentType { content_type: sent },
            Multipart(fault) => GatewayError::InvalidMultipart {
                detail: multipart_detail(fault),
            },
            Array { param, file } => {
                let expected = if file { "a file" } else { "a string" };
                let message = format!(
                    "Invalid type for '{param}': expected {expected}, but got an array instead."
                );
                field(param, "invalid_type", message)
            }
            Unknown { shown } => {
                let message = format!("Unknown parameter: '{shown}'.");
                field(shown, "unknown_parameter", message)
            }
            Missing { param } => {
                let message = format!("Missing required parameter: '{param}'.");
                field(param, "missing_required_parameter", message)
            }
            NotUtf8 { param } => {
                let message = format!(
                    "Invalid type for '{param}': expected a UTF-8 string, but got bytes that are not valid UTF-8."
                );
                field(param, "invalid_type", message)
            }
            EmptyPrompt => GatewayError::field(
                "prompt",
                "empty_string",
                "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead.",
            ),
            TooLong { param, max, got } => {
                let message = too_long(&param, max, got);
                field(param, "string_above_max_length", message)
            }
            InvalidValue {
                param,
                value,
                supported,
            } => {
                let supported: Vec<&str> = supported.iter().map(String::as_str).collect();
                let message = format!(
                    "Invalid value: '{value}'. Supported values are: {}.",
                    quoted_list(&supported)
                );
                field(param, "invalid_value", message)
            }
            NotAnInteger { param } => {
                let message = format!(
                    "Invalid type for '{param}': expected an integer, but got a string value that could not be converted into an integer."
                );
                field(param, "invalid_type", message)
            }
            BelowMin { param, min, got } => {
                let message = format!(
                    "Invalid '{param}': integer below minimum value. Expected a value >= {min}, but got {got} instead."
                );
                field(param, "integer_below_min_value", message)
            }
            AboveMax { param, max, got } => {
                let message = format!(
                    "Invalid '{param}': integer above maximum value. Expected a value <= {max}, but got {got} instead."
                );
                field(param, "integer_above_max_value", message)
            }
            Mimetype { param, declared } => {
                let message = format!(
                    "Invalid file '{param}': unsupported mimetype ('{declared}'). Supported file formats are 'image/png'."
                );
                field(param, "unsupported_file_mimetype", message)
            }
        }
    }
}

/// The detail of an `invalid_multipart` message.
fn multipart_detail(fault: MultipartFault) -> String {
    use MultipartFault::*;
    match fault {
        PartTooLarge { field } => {
            format!("the field '{field}' is larger than {MAX_TEXT_PART_BYTES} bytes")
        }
        TooManyParts { max, edit_fields } => {
            let note = if edit_fields {
                "; an edit request has at most 8 fields"
            } else {
                ""
            };
            format!("more than {max} parts{note}")
        }
        NoFieldName => "a part has no field name in its Content-Disposition header".into(),
        NoParts => "the body holds no parts".into(),
        Truncated => "the body ended before the final boundary".into(),
        PartTruncated => "a part ended before its closing boundary".into(),
        HeadersIncomplete => "a part's headers are incomplete".into(),
        HeadersUnreadable => "a part's headers could not be read".into(),
        NoBoundary => "no multipart boundary found".into(),
        Other(words) => words,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::error::rendered;

    fn field(
        param: &str,
        code: &str,
        message: &str,
    ) -> (u16, &'static str, Option<String>, String, String) {
        (
            400,
            "invalid_request_error",
            Some(param.into()),
            code.into(),
            message.into(),
        )
    }

    #[test]
    fn form_refusals_are_worded_as_openai_words_them() {
        let s = String::from;
        let cases = [
            (
                FormError::Array {
                    param: s("image"),
                    file: true,
                },
                field(
                    "image",
                    "invalid_type",
                    "Invalid type for 'image': expected a file, but got an array instead.",
                ),
            ),
            (
                FormError::Array {
                    param: s("n"),
                    file: false,
                },
                field(
                    "n",
                    "invalid_type",
                    "Invalid type for 'n': expected a string, but got an array instead.",
                ),
            ),
            (
                FormError::Unknown {
                    shown: s("quality"),
                },
                field(
                    "quality",
                    "unknown_parameter",
                    "Unknown parameter: 'quality'.",
                ),
            ),
            (
                FormError::Missing { param: s("prompt") },
                field(
                    "prompt",
                    "missing_required_parameter",
                    "Missing required parameter: 'prompt'.",
                ),
            ),
            (
                FormError::NotUtf8 { param: s("size") },
                field(
                    "size",
                    "invalid_type",
                    "Invalid type for 'size': expected a UTF-8 string, but got bytes that are not valid UTF-8.",
                ),
            ),
            (
                FormError::EmptyPrompt,
                field(
                    "prompt",
                    "empty_string",
                    "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an empty string instead.",
                ),
            ),
            (
                FormError::TooLong {
                    param: s("prompt"),
                    max: 1000,
                    got: 1001,
                },
                field(
                    "prompt",
                    "string_above_max_length",
                    "Invalid 'prompt': string too long. Expected a string with maximum length 1000, but got a string with length 1001 instead.",
                ),
            ),
            (
                FormError::InvalidValue {
                    param: s("response_format"),
                    value: s("URL"),
                    supported: vec![s("url"), s("b64_json")],
                },
                field(
                    "response_format",
                    "invalid_value",
                    "Invalid value: 'URL'. Supported values are: 'url' and 'b64_json'.",
                ),
            ),
            (
                FormError::NotAnInteger { param: s("n") },
                field(
                    "n",
                    "invalid_type",
                    "Invalid type for 'n': expected an integer, but got a string value that could not be converted into an integer.",
                ),
            ),
            (
                FormError::BelowMin {
                    param: s("n"),
                    min: 1,
                    got: s("-2"),
                },
                field(
                    "n",
                    "integer_below_min_value",
                    "Invalid 'n': integer below minimum value. Expected a value >= 1, but got -2 instead.",
                ),
            ),
            (
                FormError::AboveMax {
                    param: s("n"),
                    max: 10,
                    got: s("11"),
                },
                field(
                    "n",
                    "integer_above_max_value",
                    "Invalid 'n': integer above maximum value. Expected a value <= 10, but got 11 instead.",
                ),
            ),
            (
                FormError::Mimetype {
                    param: s("mask"),
                    declared: s("text/plain"),
                },
                field(
                    "mask",
                    "unsupported_file_mimetype",
                    "Invalid file 'mask': unsupported mimetype ('text/plain'). Supported file formats are 'image/png'.",
                ),
            ),
        ];
        for (error, want) in cases {
            assert_eq!(rendered(error.clone()), want, "{error:?}");
        }
        let ct = rendered(FormError::ContentType {
            sent: s("text/plain"),
        });
        assert_eq!(
            (ct.0, ct.2, ct.3.as_str()),
            (400, None, "unsupported_content_type")
        );
        assert!(
            ct.4.starts_with("Unsupported content type: 'text/plain'."),
            "{}",
            ct.4
        );
    }

    #[test]
    fn multipart_faults_name_what_is_wrong() {
        for (fault, detail) in [
            (
                MultipartFault::TooManyParts {
                    max: 16,
                    edit_fields: true,
                },
                "more than 16 parts; an edit request has at most 8 fields",
            ),
            (
                MultipartFault::TooManyParts {
                    max: 40,
                    edit_fields: false,
                },
                "more than 40 parts",
            ),
            (
                MultipartFault::PartTooLarge {
                    field: "size".into(),
                },
                "the field 'size' is larger than 65536 bytes",
            ),
            (MultipartFault::NoParts, "the body holds no parts"),
            (
                MultipartFault::Truncated,
                "the body ended before the final boundary",
            ),
            (MultipartFault::Other("odd".into()), "odd"),
        ] {
            let (status, kind, param, code, message) = rendered(FormError::Multipart(fault));
            assert_eq!(
                (status, kind, param, code.as_str()),
                (400, "invalid_request_error", None, "invalid_multipart")
            );
            assert_eq!(
                message,
                format!("Could not parse the multipart/form-data body: {detail}.")
            );
        }
    }
}
