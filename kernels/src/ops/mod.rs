//! Small ops of the forward pass.
