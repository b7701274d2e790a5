//! Label enums: a closed set of values of one metric label, each with its text and its index. `ALL` lists
//! them in declaration order and `index` is the declaration position, so `ALL[x.index()] == x` holds by
//! construction and a per-label array of handles (`[Counter; N]` built from `ALL`) is indexed without a
//! lookup and without a fallback: a variant added to the enum is a new series, never a silent alias of the
//! first one.

/// Declares a label enum: `label_enum! { /// doc  pub enum Name { /// doc  Variant = "text", ... } }`.
macro_rules! label_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order (the order of `index`).
            $vis const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// The label's text.
            $vis const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// The position in `ALL`.
            $vis const fn index(self) -> usize {
                self as usize
            }
        }
    };
}

pub(crate) use label_enum;

#[cfg(test)]
mod tests {
    label_enum! {
        enum Demo { First = "first", Second = "second", Third = "third" }
    }

    #[test]
    fn the_index_is_the_position_in_all() {
        for (i, v) in Demo::ALL.iter().enumerate() {
            assert_eq!(v.index(), i);
        }
        assert_eq!(Demo::ALL.map(Demo::as_str), ["first", "second", "third"]);
    }
}
