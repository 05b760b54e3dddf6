//! Metadata values.

/// GGUF metadata value type ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    pub fn from_u32(v: u32) -> Option<Self> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Size in bytes of a scalar of this type; strings take at least 8 (their length).
    pub fn min_size(self) -> usize {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// A typed array (never nested), stored compactly.
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: one vector of the element type (strings in one buffer), not a vector of
/// [`Value`]s, so a 50 k-token vocabulary costs its bytes plus an offset per token.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(StrArray),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

macro_rules! array_dispatch {
    ($self:expr, $v:ident => $e:expr) => {
        match $self {
            Array::U8($v) => $e,
            Array::I8($v) => $e,
            Array::U16($v) => $e,
            Array::I16($v) => $e,
            Array::U32($v) => $e,
            Array::I32($v) => $e,
            Array::F32($v) => $e,
            Array::Bool($v) => $e,
            Array::String($v) => $e,
            Array::U64($v) => $e,
            Array::I64($v) => $e,
            Array::F64($v) => $e,
        }
    };
}

impl Array {
    /// An empty array of element type `et` (`None` for [`ValueType::Array`]: arrays do not nest).
    pub fn empty(et: ValueType) -> Option<Self> {
        Self::with_capacity(et, 0)
    }

    pub(crate) fn with_capacity(et: ValueType, n: usize) -> Option<Self> {
        Some(match et {
            ValueType::U8 => Array::U8(Vec::with_capacity(n)),
            ValueType::I8 => Array::I8(Vec::with_capacity(n)),
            ValueType::U16 => Array::U16(Vec::with_capacity(n)),
            ValueType::I16 => Array::I16(Vec::with_capacity(n)),
            ValueType::U32 => Array::U32(Vec::with_capacity(n)),
            ValueType::I32 => Array::I32(Vec::with_capacity(n)),
            ValueType::F32 => Array::F32(Vec::with_capacity(n)),
            ValueType::Bool => Array::Bool(Vec::with_capacity(n)),
            ValueType::String => Array::String(StrArray::with_capacity(n, 0)),
            ValueType::U64 => Array::U64(Vec::with_capacity(n)),
            ValueType::I64 => Array::I64(Vec::with_capacity(n)),
            ValueType::F64 => Array::F64(Vec::with_capacity(n)),
            ValueType::Array => return None,
        })
    }

    /// An array of element type `et` holding `items`. On a mismatch, `Err` carries the type of
    /// the first item that is not an `et` (`ValueType::Array` for `et` itself being `Array`).
    pub fn from_values(
        et: ValueType,
        items: impl IntoIterator<Item = Value>,
    ) -> std::result::Result<Self, ValueType> {
        let mut a = Self::empty(et).ok_or(ValueType::Array)?;
        for x in items {
            let found = x.ty();
            if !a.push(x) {
                return Err(found);
            }
        }
        Ok(a)
    }

    /// Appends `x` if it has the element type; returns whether it did.
    pub fn push(&mut self, x: Value) -> bool {
        match (self, x) {
            (Array::U8(v), Value::U8(x)) => v.push(x),
            (Array::I8(v), Value::I8(x)) => v.push(x),
            (Array::U16(v), Value::U16(x)) => v.push(x),
            (Array::I16(v), Value::I16(x)) => v.push(x),
            (Array::U32(v), Value::U32(x)) => v.push(x),
            (Array::I32(v), Value::I32(x)) => v.push(x),
            (Array::F32(v), Value::F32(x)) => v.push(x),
            (Array::Bool(v), Value::Bool(x)) => v.push(x),
            (Array::String(v), Value::String(x)) => v.push(&x),
            (Array::U64(v), Value::U64(x)) => v.push(x),
            (Array::I64(v), Value::I64(x)) => v.push(x),
            (Array::F64(v), Value::F64(x)) => v.push(x),
            _ => return false,
        }
        true
    }

    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    pub fn len(&self) -> usize {
        array_dispatch!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a [`Value`] (strings are copied).
    pub fn get(&self, i: usize) -> Option<Value> {
        Some(match self {
            Array::U8(v) => Value::U8(*v.get(i)?),
            Array::I8(v) => Value::I8(*v.get(i)?),
            Array::U16(v) => Value::U16(*v.get(i)?),
            Array::I16(v) => Value::I16(*v.get(i)?),
            Array::U32(v) => Value::U32(*v.get(i)?),
            Array::I32(v) => Value::I32(*v.get(i)?),
            Array::F32(v) => Value::F32(*v.get(i)?),
            Array::Bool(v) => Value::Bool(*v.get(i)?),
            Array::String(v) => Value::String(v.get(i)?.to_string()),
            Array::U64(v) => Value::U64(*v.get(i)?),
            Array::I64(v) => Value::I64(*v.get(i)?),
            Array::F64(v) => Value::F64(*v.get(i)?),
        })
    }

    /// The elements as [`Value`]s (strings are copied).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Value> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index in range"))
    }

    /// Element `i` as an integer, as [`Value::as_i64`] (`None` for strings and floats).
    pub fn i64_at(&self, i: usize) -> Option<i64> {
        Some(match self {
            Array::U8(v) => *v.get(i)? as i64,
            Array::I8(v) => *v.get(i)? as i64,
            Array::U16(v) => *v.get(i)? as i64,
            Array::I16(v) => *v.get(i)? as i64,
            Array::U32(v) => *v.get(i)? as i64,
            Array::I32(v) => *v.get(i)? as i64,
            Array::U64(v) => i64::try_from(*v.get(i)?).ok()?,
            Array::I64(v) => *v.get(i)?,
            Array::Bool(v) => *v.get(i)? as i64,
            Array::F32(_) | Array::F64(_) | Array::String(_) => return None,
        })
    }

    /// Element `i` as a number, as [`Value::as_f64`] (`None` for strings).
    pub fn f64_at(&self, i: usize) -> Option<f64> {
        match self {
            Array::F32(v) => v.get(i).map(|&x| x as f64),
            Array::F64(v) => v.get(i).copied(),
            _ => self.i64_at(i).map(|x| x as f64),
        }
    }

    /// The strings of a string array.
    pub fn as_strs(&self) -> Option<&StrArray> {
        match self {
            Array::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements of an f32 array.
    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            Array::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Releases spare capacity.
    pub(crate) fn shrink_to_fit(&mut self) {
        match self {
            Array::String(s) => s.shrink_to_fit(),
            other => array_dispatch!(other, v => v.shrink_to_fit()),
        }
    }
}

/// Strings stored back to back in one buffer, with the end offset of each.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct StrArray {
    data: String,
    ends: Vec<u32>,
}

impl StrArray {
    pub fn new() -> Self {
        Self::default()
    }

    /// Room for `n` strings of `bytes` bytes in all.
    pub fn with_capacity(n: usize, bytes: usize) -> Self {
        Self {
            data: String::with_capacity(bytes),
            ends: Vec::with_capacity(n),
        }
    }

    /// Appends a string. Panics if the strings would total 4 GiB or more.
    pub fn push(&mut self, s: &str) {
        assert!(self.try_push(s), "string array exceeds 4 GiB");
    }

    /// Appends a string unless the strings would total 4 GiB or more; returns whether it did.
    pub fn try_push(&mut self, s: &str) -> bool {
        let Some(end) = u32::try_from(self.data.len() + s.len()).ok() else {
            return false;
        };
        self.data.push_str(s);
        self.ends.push(end);
        true
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        Some(&self.data[start..end])
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + DoubleEndedIterator + '_ {
        (0..self.len()).map(|i| self.get(i).expect("index in range"))
    }

    /// Total bytes of all the strings.
    pub fn total_bytes(&self) -> usize {
        self.data.len()
    }

    fn shrink_to_fit(&mut self) {
        self.data.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}

impl std::fmt::Debug for StrArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for StrArray {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut a = Self::new();
        for s in iter {
            a.push(s.as_ref());
        }
        a
    }
}

impl Value {
    pub fn ty(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Any integer type as i64 (u64 above i64::MAX gives None).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(v) => v as i64,
            Value::I8(v) => v as i64,
            Value::U16(v) => v as i64,
            Value::I16(v) => v as i64,
            Value::U32(v) => v as i64,
            Value::I32(v) => v as i64,
            Value::U64(v) => i64::try_from(v).ok()?,
            Value::I64(v) => v,
            Value::Bool(b) => b as i64,
            _ => return None,
        })
    }

    /// Any number as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short description for listings (`lethe inspect`).
    pub fn summary(&self, max_chars: usize) -> String {
        let s = match self {
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) => {
                let head: Vec<String> = (0..a.len().min(4))
                    .filter_map(|i| a.get(i))
                    .map(|x| x.summary(24))
                    .collect();
                let more = if a.len() > 4 { ", ..." } else { "" };
                format!(
                    "[{}; {}] [{}{}]",
                    a.elem_type().name(),
                    a.len(),
                    head.join(", "),
                    more
                )
            }
            Value::F32(x) => format!("{x}"),
            Value::F64(x) => format!("{x}"),
            Value::Bool(b) => format!("{b}"),
            other => format!("{}", other.as_i64().unwrap_or_default()),
        };
        if s.chars().count() > max_chars {
            let mut t: String = s.chars().take(max_chars.saturating_sub(3)).collect();
            t.push_str("...");
            t
        } else {
            s
        }
    }
}
