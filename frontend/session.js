// What this tab remembers in memory only (never storage): the secrets of keys created here, so the
// playground can use a key right after it was created. Gone on reload, like the "shown once" dialog.
export const createdKeys = new Map(); // key id → {name, secret}
