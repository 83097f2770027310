//! Restoring a document to a snapshot as an ordinary Yjs edit.
//!
//! Applying an old snapshot's update to a document changes nothing (Yjs already has every item in it),
//! so a restore has to be an edit: one that deletes what the document holds now and inserts the snapshot's
//! content again, as new items. That edit is stored and relayed like any client's, and because deletions
//! in Yjs are permanent, a client that reconnects later with the reverted content in its own state cannot
//! bring it back by merging: the server's deletion set removes it there too. Edits the server had not
//! received when the restore was made (a client editing offline) are concurrent with it and are kept,
//! merged next to the restored content, as any concurrent Yjs edits are.
//!
//! The edit is computed on a scratch copy of the document with a client id of its own, from the root types
//! of both states. Root types carry no type in the update format, so their kind is inferred from their
//! content (yrs's inference: text when the first item is a string, an embed or a format; map when only
//! keys; array otherwise, which is also what an `XmlFragment` looks like at the root):
//! - text: deleted, then the snapshot's delta inserted with its formatting attributes and embeds;
//! - map: keys the snapshot lacks are removed, keys whose value differs are set again (deep copies of
//!   nested shared types), equal primitive values are left alone;
//! - array / XML fragment: every element deleted, the snapshot's elements inserted (deep copies, XML
//!   elements with their attributes and children);
//! - a root that exists now but not in the snapshot is emptied (it cannot be removed: Yjs has no such
//!   operation); a root element or text with attributes gets both treatments.
//!
//! Not restored: subdocuments (their content lives in other documents), and anything outside the
//! document's content (awareness, undo managers' history on clients).

use yrs::branch::BranchPtr;
use yrs::types::{AsPrelim, Delta};
use yrs::updates::decoder::Decode;
use yrs::{
    Any, Array, ArrayRef, Doc, In, Map, MapRef, Out, ReadTxn, StateVector, Text, TextRef, Transact,
    TransactionMut, Update, WriteTxn,
};

use super::doc::DocError;

/// What a root type holds, as far as restoring it goes.
enum Content {
    Text(Vec<Delta<In>>),
    Map(Vec<(String, In)>),
    List(Vec<In>),
    /// A root element or XML text: attributes plus a list or a delta.
    Both(Vec<(String, In)>, Box<Content>),
    /// Something a restore leaves alone (a subdocument at the root).
    Other,
}

impl Content {
    fn of<T: ReadTxn>(out: &Out, txn: &T) -> Content {
        match out.as_prelim(txn) {
            In::Text(d) => Content::Text(d.to_vec()),
            In::Map(m) => Content::Map(m.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()),
            In::Array(a) => Content::List(a.to_vec()),
            In::XmlText(x) => {
                Content::Both(attributes(&x.attributes), Box::new(Content::Text(x.delta)))
            }
            In::XmlElement(e) => Content::Both(
                attributes(&e.attributes),
                Box::new(Content::List(e.children.into_iter().map(xml_in).collect())),
            ),
            In::XmlFragment(_) | In::Any(_) | In::Doc(_) => Content::Other,
            #[allow(unreachable_patterns)]
            _ => Content::Other,
        }
    }

    fn map(&self) -> &[(String, In)] {
        match self {
            Content::Map(m) | Content::Both(m, _) => m,
            _ => &[],
        }
    }

    fn sequence(&self) -> Option<&Content> {
        match self {
            Content::Text(_) | Content::List(_) => Some(self),
            Content::Both(_, s) => Some(s),
            _ => None,
        }
    }
}

fn attributes(a: &std::collections::HashMap<std::sync::Arc<str>, String>) -> Vec<(String, In)> {
    a.iter()
        .map(|(k, v)| (k.to_string(), In::Any(Any::from(v.as_str()))))
        .collect()
}

fn xml_in(x: yrs::types::xml::XmlIn) -> In {
    use yrs::types::xml::XmlIn;
    match x {
        XmlIn::Text(t) => In::XmlText(t),
        XmlIn::Element(e) => In::XmlElement(e),
        XmlIn::Fragment(f) => In::XmlFragment(f),
    }
}

fn decode(bytes: &[u8]) -> Result<Update, DocError> {
    Update::decode_v1(bytes).map_err(|e| DocError::Corrupt(e.to_string()))
}

/// A Yjs v1 update that, applied to a document whose whole state is `current`, makes the content of each
/// of its root types equal to that root's content in `target` (both full-state updates). yrs panics on
/// some malformed input, so a panic is an error here, not a dead task.
pub fn restore_update(current: &[u8], target: &[u8]) -> Result<Vec<u8>, DocError> {
    let (current, target) = (decode(current)?, decode(target)?);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compute(current, target)))
        .map_err(|_| DocError::Corrupt("the restore could not be computed".into()))?
}

fn compute(current: Update, target: Update) -> Result<Vec<u8>, DocError> {
    // A fresh random client id: the restore's items are new ones, never confused with a client's.
    let live = Doc::new();
    live.transact_mut()
        .apply_update(current)
        .map_err(|e| DocError::Corrupt(e.to_string()))?;
    let snap = Doc::new();
    snap.transact_mut()
        .apply_update(target)
        .map_err(|e| DocError::Corrupt(e.to_string()))?;

    let stxn = snap.transact();
    let wanted: Vec<(String, Content)> = stxn
        .root_refs()
        .map(|(name, out)| (name.to_string(), Content::of(&out, &stxn)))
        .collect();
    let (before, existing) = {
        let txn = live.transact();
        let existing: Vec<(String, Content)> = txn
            .root_refs()
            .map(|(name, out)| (name.to_string(), Content::of(&out, &txn)))
            .collect();
        (txn.state_vector(), existing)
    };
    let mut txn = live.transact_mut();
    for (name, want) in &wanted {
        let now = existing.iter().find(|(n, _)| n == name).map(|(_, c)| c);
        restore_root(&mut txn, name, now, want);
    }
    for (name, now) in &existing {
        if !wanted.iter().any(|(n, _)| n == name) {
            restore_root(&mut txn, name, Some(now), &Content::Map(Vec::new()));
        }
    }
    drop(txn);
    let update = live.transact().encode_state_as_update_v1(&before);
    Ok(update)
}

/// The root `name` as a branch, created when missing (its local type does not matter: only its items
/// are encoded).
fn root(txn: &mut TransactionMut, name: &str) -> BranchPtr {
    let map = txn.get_or_insert_map(name);
    BranchPtr::from(map.as_ref())
}

fn restore_root(txn: &mut TransactionMut, name: &str, now: Option<&Content>, want: &Content) {
    if matches!(want, Content::Other) || matches!(now, Some(Content::Other)) {
        return;
    }
    let branch = root(txn, name);
    // The map part: remove what the snapshot lacks or holds differently, set what differs.
    let map = MapRef::from(branch);
    let want_map = want.map();
    let keys: Vec<String> = map.keys(txn).map(str::to_string).collect();
    let mut same: Vec<&str> = Vec::new();
    for k in &keys {
        let wanted = want_map.iter().find(|(w, _)| w == k).map(|(_, v)| v);
        match (wanted, map.get(txn, k)) {
            (Some(In::Any(w)), Some(Out::Any(v))) if *w == v => same.push(k),
            _ => {
                map.remove(txn, k);
            }
        }
    }
    for (k, v) in want_map {
        if !same.contains(&k.as_str()) {
            map.insert(txn, k.as_str(), v.clone());
        }
    }
    // The sequence part: the snapshot's content inserted at the start, then everything that was there
    // deleted. In that order, edits made offline against the old content (whose neighbours are the old
    // items) land after the restored content, not interleaved with it.
    let text = TextRef::from(branch);
    let list = ArrayRef::from(branch);
    let before = match now.and_then(Content::sequence) {
        Some(Content::Text(_)) => text.len(txn),
        Some(_) => list.len(txn),
        None => 0,
    };
    let (inserted, old_is_text) = match want.sequence() {
        Some(Content::Text(delta)) => {
            text.apply_delta(txn, delta.iter().cloned());
            (text.len(txn).saturating_sub(before), true)
        }
        Some(Content::List(items)) => {
            for (i, item) in items.iter().enumerate() {
                list.insert(txn, i as u32, item.clone());
            }
            (items.len() as u32, false)
        }
        _ => (
            0,
            matches!(now.and_then(Content::sequence), Some(Content::Text(_))),
        ),
    };
    if before > 0 {
        if old_is_text {
            text.remove_range(txn, inserted, before);
        } else {
            list.remove_range(txn, inserted, before);
        }
    }
}

/// The state vector of a full-state update (tests and checks).
pub fn state_vector_of(update: &[u8]) -> Result<StateVector, DocError> {
    let doc = Doc::new();
    doc.transact_mut()
        .apply_update(decode(update)?)
        .map_err(|e| DocError::Corrupt(e.to_string()))?;
    let sv = doc.transact().state_vector();
    Ok(sv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::types::text::YChange;
    use yrs::types::ToJson;
    use yrs::{GetString, MapPrelim, XmlElementPrelim, XmlFragment, XmlTextPrelim};

    fn state(doc: &Doc) -> Vec<u8> {
        doc.transact()
            .encode_state_as_update_v1(&StateVector::default())
    }

    fn apply(doc: &Doc, update: &[u8]) {
        doc.transact_mut()
            .apply_update(Update::decode_v1(update).unwrap())
            .unwrap();
    }

    /// As JSON values: map keys come in no particular order.
    fn json(doc: &Doc, f: impl Fn(&yrs::Transaction) -> Any) -> serde_json::Value {
        let txn = doc.transact();
        let mut s = String::new();
        f(&txn).to_json(&mut s);
        serde_json::from_str(&s).unwrap()
    }

    /// A formatted text, a map with a nested map, an array and an XML fragment all come back, and a
    /// client holding the reverted content cannot bring it back by merging.
    #[test]
    fn every_root_kind_comes_back_and_merging_old_state_does_not_resurrect() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        let map = doc.get_or_insert_map("m");
        let arr = doc.get_or_insert_array("a");
        let xml = doc.get_or_insert_xml_fragment("x");
        {
            let mut txn = doc.transact_mut();
            text.insert(&mut txn, 0, "Hello ");
            let bold: yrs::types::Attrs = [("bold".into(), Any::Bool(true))].into();
            text.insert_with_attributes(&mut txn, 6, "bold", bold);
            text.insert(&mut txn, 10, " world");
            map.insert(&mut txn, "title", "v1");
            map.insert(&mut txn, "keep", 7);
            map.insert(&mut txn, "nested", MapPrelim::from([("a", 1)]));
            arr.insert(&mut txn, 0, "one");
            arr.insert(&mut txn, 1, 2);
            let p = xml.insert(&mut txn, 0, XmlElementPrelim::empty("p"));
            p.insert(&mut txn, 0, XmlTextPrelim::new("para"));
        }
        let snapshot = state(&doc);
        let want_text = text.diff(&doc.transact(), YChange::identity);
        let want_map = json(&doc, |t| map.to_json(t));
        let want_arr = json(&doc, |t| arr.to_json(t));
        let want_xml = xml.get_string(&doc.transact());

        // Later edits, every kind, including formatting and a root the snapshot did not have.
        let later = doc.get_or_insert_text("later");
        {
            let mut txn = doc.transact_mut();
            text.remove_range(&mut txn, 0, 6);
            let italic: yrs::types::Attrs = [("italic".into(), Any::Bool(true))].into();
            text.format(&mut txn, 0, 4, italic);
            text.insert(&mut txn, 0, "XX");
            map.insert(&mut txn, "title", "v2");
            map.insert(&mut txn, "extra", true);
            map.remove(&mut txn, "nested");
            arr.remove(&mut txn, 0);
            arr.push_back(&mut txn, "three");
            xml.insert(&mut txn, 1, XmlElementPrelim::empty("h1"));
            later.push(&mut txn, "new root");
        }
        // A client that has all of it (and will reconnect later with it).
        let offline = Doc::new();
        apply(&offline, &state(&doc));

        let update = restore_update(&state(&doc), &snapshot).unwrap();
        apply(&doc, &update);
        let check = |d: &Doc| {
            // Refs first: taking one needs a write transaction, which waits for any read one.
            let (t, m, a) = (
                d.get_or_insert_text("t"),
                d.get_or_insert_map("m"),
                d.get_or_insert_array("a"),
            );
            let (x, later) = (
                d.get_or_insert_xml_fragment("x"),
                d.get_or_insert_text("later"),
            );
            assert_eq!(t.diff(&d.transact(), YChange::identity), want_text);
            assert_eq!(json(d, |txn| m.to_json(txn)), want_map);
            assert_eq!(json(d, |txn| a.to_json(txn)), want_arr);
            assert_eq!(x.get_string(&d.transact()), want_xml);
            assert_eq!(later.get_string(&d.transact()), "");
        };
        check(&doc);
        // The offline client's full state merged into the server's: nothing reverted comes back.
        apply(&doc, &state(&offline));
        check(&doc);
        // And the offline client, given the server's state, ends the same.
        apply(&offline, &state(&doc));
        check(&offline);
        // The keys equal in both were not rewritten (no churn for what did not change).
        assert!(update.len() < snapshot.len() * 4);
    }

    #[test]
    fn an_edit_made_offline_after_the_restore_point_is_kept() {
        let doc = Doc::new();
        let text = doc.get_or_insert_text("t");
        text.push(&mut doc.transact_mut(), "base");
        let snapshot = state(&doc);
        text.push(&mut doc.transact_mut(), " later");
        let offline = Doc::new();
        apply(&offline, &state(&doc));
        let before = offline.transact().state_vector();
        offline
            .get_or_insert_text("t")
            .push(&mut offline.transact_mut(), "!");
        let offline_edit = offline.transact().encode_state_as_update_v1(&before);

        apply(&doc, &restore_update(&state(&doc), &snapshot).unwrap());
        assert_eq!(text.get_string(&doc.transact()), "base");
        apply(&doc, &offline_edit);
        assert_eq!(text.get_string(&doc.transact()), "base!");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(restore_update(&[0xff, 0xff, 0xff], &[0]).is_err());
    }
}
